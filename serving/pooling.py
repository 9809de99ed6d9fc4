"""Sentence embeddings from an encoder's token states, for `/v1/embeddings`.

How a model pools is its own choice: a sentence-transformers folder says it in `1_Pooling/config.json`
(mean, CLS token, max, or mean × √length), and its input limit in `sentence_bert_config.json`; without
them, the mean over the real (unpadded) tokens and the model's position table. Every
embedding is then scaled to unit length, as OpenAI's are, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

POOLING_CONFIG = Path("1_Pooling") / "config.json"
SENTENCE_CONFIG = "sentence_bert_config.json"
MODES = ("mean", "cls", "max", "mean_sqrt_len")


def pooling_mode(model_dir: Path) -> str:
    """The pooling a sentence-transformers folder declares (the first one set), else "mean"."""
    path = Path(model_dir) / POOLING_CONFIG
    if not path.is_file():
        return "mean"
    config = json.loads(path.read_text())
    for mode, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                      ("max", "pooling_mode_max_tokens"), ("mean_sqrt_len", "pooling_mode_mean_sqrt_len_tokens")):
        if config.get(key):
            return mode
    return "mean"


def max_sequence_length(model_dir: Path) -> int | None:
    """The input length a sentence-transformers folder declares (all-MiniLM-L6-v2: 256 of its 512
    positions); sentence-transformers cuts longer inputs there, we refuse them (as OpenAI does)."""
    path = Path(model_dir) / SENTENCE_CONFIG
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("max_seq_length")
    return value if isinstance(value, int) and value > 0 else None


def pool(states: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(batch, dim) unit-length embeddings from token states (batch, tokens, dim) and the attention mask."""
    states = states.float()
    weights = mask.unsqueeze(-1).to(states.dtype)
    if mode == "cls":
        pooled = states[:, 0]
    elif mode == "max":
        pooled = states.masked_fill(weights == 0, float("-inf")).amax(1)
    else:
        summed = (states * weights).sum(1)
        count = weights.sum(1).clamp(min=1)
        pooled = summed / (count.sqrt() if mode == "mean_sqrt_len" else count)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)
