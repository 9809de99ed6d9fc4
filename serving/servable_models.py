"""Loading what the engine serves: a base model (once per base, dtype and device), a full fine-tune, a
classifier, or an encoder for embeddings, each onto the serving device in the serving dtype. Runs on the
engine's loader thread.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from svfit_core.bases import BasisStore
from svfit_core.training.outputs import load_trained_model
from svfit_core.layer import weight_sha256
from svfit_core.loading import load_base_model, load_tokenizer, max_positions
from svfit_core.targets import LINEAR_TYPES

from serving.types import ModelRef


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, setting, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"inference_dtype {setting!r} is not a torch dtype")
    return dtype


def _place(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_causal_base(path: Path, dtype: torch.dtype, device: torch.device):
    """``(model, tokenizer, base_hashes)``. SVFit adapters record sha256s of the float32 base weights they
    were trained on; when serving in another dtype those are taken before the cast (else None: hashed on
    demand from the loaded weights)."""
    model, tokenizer = load_base_model(path, "causal")
    hashes = None
    if dtype != torch.float32:
        hashes = {name: weight_sha256(m.weight) for name, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}
    return _place(model, dtype, device), tokenizer, hashes


def load_full_model(ref: ModelRef, dtype: torch.dtype, device: torch.device):
    """A full fine-tune is a whole model folder; its tokenizer is the base model's (training saves none)."""
    model = AutoModelForCausalLM.from_pretrained(ref.adapter_dir, dtype=torch.float32, trust_remote_code=False)
    tokenizer = load_tokenizer(ref.base_path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return _place(model, dtype, device), tokenizer


def load_adapted_model(ref: ModelRef, dtype: torch.dtype, device: torch.device, bases: BasisStore | None = None):
    """Any fine-tune through the training library's own loader (classifiers; SVFit adapters that train a
    whole module). Merged for speed where the method allows: the model serves one adapter only. ``bases``:
    where a compact SVFit adapter's bases are."""
    model, tokenizer, _ = load_trained_model(ref.base_path, ref.adapter_dir, bases)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return _place(model, dtype, device), tokenizer


def is_encoder(path: Path) -> bool:
    """Whether the base model folder holds an encoder (BERT-like) rather than a text generator."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):  # a GGUF-only folder has no config.json: the bundled chat model
        return False
    generators = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    decoder = getattr(config, "is_decoder", False)  # not every config has it (Llama's has not)
    return not decoder and not any(a.endswith(generators) for a in getattr(config, "architectures", None) or [])


def load_encoder(ref: ModelRef, dtype: torch.dtype, device: torch.device, bases: BasisStore | None = None):
    """The encoder that embeds for ``ref``: the base's, or a classification fine-tune's body (its adapter
    applied, its head left out)."""
    if ref.adapter_dir is None:
        model = AutoModel.from_pretrained(ref.base_path, dtype=torch.float32, trust_remote_code=False)
        tokenizer = load_tokenizer(ref.base_path)
    else:
        classifier, tokenizer = load_adapted_model(ref, torch.float32, torch.device("cpu"), bases)
        model = classifier.base_model
    return _place(model, dtype, device), tokenizer


def context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """How many tokens (prompt + completion) the model takes; its position table, else the tokenizer's limit."""
    limit = max_positions(model)
    if limit is None:
        limit = getattr(tokenizer, "model_max_length", None)
        if not isinstance(limit, int) or limit > 1_000_000:  # transformers' "no limit" sentinel is ~1e30
            limit = 1_000_000
    return limit


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


