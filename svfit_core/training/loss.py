"""The training loss of one micro-batch: summed cross-entropy and the number of correct predictions, for a
causal LM (next-token targets) or a sequence classifier.

A causal LM's loss never holds fp32 logits of the whole vocabulary for the whole micro-batch: the model's
body gives hidden states, and ``lm_head`` plus an fp32 cross-entropy run on chunks of target tokens. At a
128k vocabulary, fp32 logits of 4,096 tokens take 2 GB, and the softmax and its gradient as much again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from svfit_core.training.encoding import IGNORE_INDEX

# Target tokens per lm_head + cross-entropy chunk: at a 128k vocabulary one chunk's logits take 0.5 GB in
# fp32, small next to a 1–8B model, and 1,024 rows still keep the head's matmul efficient.
LOSS_CHUNK_TOKENS = 1024

# Architectures whose causal-LM forward is exactly ``lm_head(body(...).last_hidden_state)``, so the loss may
# call the two itself. Others (Gemma 2's logit soft-capping, Cohere's and Granite's logit scaling, ...) keep
# their own forward, and only the cross-entropy is chunked.
HIDDEN_STATE_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"})

__all__ = [
    "LOSS_CHUNK_TOKENS",
    "causal_loss",
    "causal_targets",
    "chunked_cross_entropy",
    "chunked_token_logprobs",
    "classification_loss",
    "transformers_model",
]


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model``, which may be wrapped (``SVFitModel``, a PEFT ``PeftModel``)."""
    for module in model.modules():  # pre-order: the outermost transformers model comes first
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(f"{type(model).__name__} holds no transformers model")


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the rows and the number of rows classified correctly."""
    labels = batch["labels"]  # (B,)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()  # (B, C): a few classes, nothing to chunk
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(-1) == labels).sum()
    return loss_sum, correct


def causal_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the batch's target tokens and the number predicted correctly."""
    hidden, targets, head, _ = causal_targets(model, batch)
    return chunked_cross_entropy(hidden, targets, head, chunk_tokens)


def causal_targets(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, nn.Module, torch.Tensor]:
    """The hidden states (T, H) at the positions that predict a target token, those targets (T,), the head
    that maps the one onto the vocabulary, and each target's row in the batch (T,).

    Positions whose label is ``IGNORE_INDEX`` (prompts, zero-weight turns, padding) are dropped before the
    head runs, so they cost nothing and count nowhere.
    """
    labels = batch["labels"]  # (B, L)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inner = transformers_model(model)
    if inner.config.model_type in HIDDEN_STATE_MODEL_TYPES:
        # The body's forward is the model's minus the head; the adapters sit inside it either way.
        hidden = inner.base_model(**inputs, use_cache=False).last_hidden_state  # (B, L, H)
        head = inner.get_output_embeddings()
    else:
        hidden = model(**inputs).logits  # (B, L, V), in the compute dtype
        head = nn.Identity()
    hidden, labels = hidden[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    keep = labels != IGNORE_INDEX  # (B, L-1)
    rows = keep.nonzero()[:, 0]  # row-major, the order hidden[keep] takes
    return hidden[keep], labels[keep], head, rows


def chunked_cross_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ cross-entropy(head(hidden), targets) in fp32 and the number of correct argmaxes, ``chunk_tokens``
    rows of ``hidden`` (T, H) at a time; exactly the unchunked sums, up to the order of the additions."""
    if not len(targets):  # nothing to predict: a zero that still backpropagates, as cross_entropy's would
        return hidden.float().sum(), torch.zeros((), dtype=torch.long, device=hidden.device)

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h).float()  # (c, V)
        return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(-1) == y).sum()

    loss_sum = torch.zeros((), device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, len(targets), chunk_tokens):
        h, y = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]  # (c, H), (c,)
        if torch.is_grad_enabled():
            # Without this, autograd would keep every chunk's (c, V) logits and softmax until backward, which
            # is the whole-vocabulary tensor chunking is meant to avoid. Checkpointed, a chunk keeps only its
            # (c, H) input and recomputes its logits during backward, one chunk at a time. The head and the
            # loss draw no random numbers, so there is no RNG state to preserve.
            chunk_sum, chunk_correct = checkpoint(chunk_loss, h, y, use_reentrant=False, preserve_rng_state=False)
        else:
            chunk_sum, chunk_correct = chunk_loss(h, y)
        loss_sum = loss_sum + chunk_sum
        correct = correct + chunk_correct
    return loss_sum, correct


def chunked_token_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> torch.Tensor:
    """log p(target) of each of the T rows of ``hidden`` (T, H) in fp32 (T,), ``chunk_tokens`` rows at a time,
    with the memory behaviour of ``chunked_cross_entropy``."""

    def chunk_logprobs(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(head(h).float(), y, reduction="none")  # (c,)

    pieces = []
    for start in range(0, len(targets), chunk_tokens):
        h, y = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(chunk_logprobs, h, y, use_reentrant=False, preserve_rng_state=False))
        else:
            pieces.append(chunk_logprobs(h, y))
    if not pieces:  # nothing to score: an empty result that still backpropagates
        return hidden.float().sum(-1)
    return torch.cat(pieces)
