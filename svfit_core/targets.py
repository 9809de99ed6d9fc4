"""Which modules of a model SVFit adapts, and which it trains in full (a classifier's head and pooler).

Owns the target-spec rule documented in ``config.py``, the per-architecture defaults, the "all-linear"
rule (linear layers inside the transformer blocks only), the fused-projection bookkeeping, and the refusal
of targets SVFit cannot decompose (quantized layers).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import ALL_LINEAR
from .errors import ConfigError, TargetModulesNotFoundError, UnsupportedLayerError

LINEAR_TYPES = (nn.Linear, Conv1D)

# Weight dtypes whose elements are the matrix entries. Anything else (bitsandbytes' uint8 blocks of packed
# 4-bit values, int8 rows with separate scales, fp8 with per-tensor scales) would be decomposed as the
# storage, not as W.
DENSE_WEIGHT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Quantized linears that subclass nn.Linear, so the target rule picks them, but whose forward is not
# x Wᵀ + b on their ``weight``: bitsandbytes, GPTQ, AWQ, HQQ. Matched by class name so that none of those
# packages need be installed to refuse them.
QUANTIZED_LINEAR_NAMES = frozenset(
    {"Linear4bit", "Linear8bitLt", "QuantLinear", "WQLinear_GEMM", "WQLinear_GEMV", "HQQLinear"}
)

# q and v attention projections, the paper's and LoRA's usual setting. GPT-2 has no separate q and v:
# its fused q|k|v `c_attn` is adapted as one matrix (see FUSED_PROJECTION_MODE).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
}

# Leaf names of projections that stack several logical matrices (q|k|v) into one weight.
FUSED_PROJECTION_NAMES = ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "W_pack")
# Our choice for fused projections: one SVD of the whole fused matrix (not one per slice). It keeps one
# layer per weight, matches how LoRA adapts `c_attn`, and exports as a plain LoRA module. Recorded in the
# adapter config so a future per-slice mode can tell the artifacts apart.
FUSED_PROJECTION_MODE = "whole_matrix"

# What a classifier trains in full beside its adapters (``classification_modules``): its task head, that is
# every top-level module outside the backbone that has parameters (`score` on Llama and GPT-2, `classifier`
# on BERT and RoBERTa; DistilBERT's `pre_classifier` and DeBERTa-v2's `pooler`, initialised with the head,
# come with it), and these dense layers between encoder and head that sit at the top of the backbone:
# BERT's (MiniLM's, ALBERT's) `pooler`, a dense + tanh over the first token. Its pretrained weights served
# next-sentence prediction or nothing (sentence-transformers checkpoints never trained it); left frozen, it
# hands the head nearly constant features (a linear probe of frozen MiniLM on SST-2: 72.0 through the
# pooler, 78.7 on mean-pooled states; SVFit and LoRA ended as majority-class predictors on a CoLA-like
# task). RoBERTa's `classifier` holds its own dense layer and `score` reads the last hidden state directly:
# nothing to add there. Never a target: "all-linear" stays inside the blocks, and a listed target inside a
# module trained in full is left to it (``inject_svfit``; HF PEFT does the same for LoRA). In training,
# head_only leaves the pooler frozen and full trains it with the body (``Method.head_includes_pooler``).
BACKBONE_POOLERS = ("pooler",)


def _matches_name(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every ``nn.Linear``/``Conv1D`` in ``model``, in module order."""
    return [name for name, mod in model.named_modules() if isinstance(mod, LINEAR_TYPES)]


def block_prefixes(model: nn.Module) -> list[str]:
    """Names of the outermost ``nn.ModuleList``s of identical blocks holding linear layers
    (``transformer.h``, ``model.layers``, ``bert.encoder.layer``): the transformer stack(s)."""
    prefixes: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if any(name.startswith(p + ".") for p in prefixes):
            continue  # nested lists (experts inside a block) are already covered
        if len({type(child) for child in mod}) != 1:
            continue
        if any(isinstance(sub, LINEAR_TYPES) for sub in mod.modules()):
            prefixes.append(name)
    return prefixes


def default_target_modules(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"no default SVFit targets for model_type {model_type!r}; pass target_modules explicitly "
            f"(known: {', '.join(sorted(DEFAULT_TARGETS))})",
            code="no_default_targets",
        )
    return list(DEFAULT_TARGETS[model_type])


def _not_found(what: str, missing: list[str], available: list[str]) -> TargetModulesNotFoundError:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in available})
    example = f" (e.g. {available[0]})" if available else ""
    return TargetModulesNotFoundError(
        f"{what} {missing!r} matched no linear module; linear modules in this model: "
        f"{', '.join(leaves) or 'none'}{example}",
        missing=missing,
        available=available,
    )


def resolve_targets(model: nn.Module, spec: list[str] | str | None) -> list[str]:
    """Full names of the linear modules ``spec`` selects (see ``config.py`` for the rule)."""
    linear = linear_module_names(model)
    if spec is None:
        spec = default_target_modules(model)
    if spec == ALL_LINEAR:
        prefixes = block_prefixes(model)
        found = [n for n in linear if any(n.startswith(p + ".") for p in prefixes)]
        if not found:
            raise _not_found("target_modules", [ALL_LINEAR], linear)
        return found
    if isinstance(spec, str):
        pattern = re.compile(spec)
        found = [n for n in linear if pattern.fullmatch(n)]
        if not found:
            raise _not_found("target_modules regex", [spec], linear)
        return found
    missing = [entry for entry in spec if not any(_matches_name(n, entry) for n in linear)]
    if missing:
        raise _not_found("target_modules", missing, linear)
    return [n for n in linear if any(_matches_name(n, entry) for entry in spec)]


def check_adaptable(name: str, module: nn.Module) -> None:
    """Raise ``UnsupportedLayerError`` unless ``module`` holds a dense floating-point weight SVFit can
    decompose (checked before any SVD, so a quantized base fails at once rather than after minutes)."""
    weight = getattr(module, "weight", None)
    kind = type(module).__name__
    quantized = any(cls.__name__ in QUANTIZED_LINEAR_NAMES for cls in type(module).__mro__)
    if quantized or not isinstance(weight, torch.Tensor) or weight.dtype not in DENSE_WEIGHT_DTYPES:
        stored = f"a {weight.dtype} weight" if isinstance(weight, torch.Tensor) else "no weight tensor"
        raise UnsupportedLayerError(
            f"module {name!r} is a {kind} with {stored}: SVFit adapts dense floating-point weights only "
            "(load the base model unquantized, or choose other target_modules)",
            module=name,
            layer_type=kind,
        )


def is_classification_model(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification"))


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def classification_modules(model: nn.Module, *, with_pooler: bool = True) -> list[str]:
    """Full names of the modules a classifier trains in full, in module order: its task head and, with
    ``with_pooler``, the ``BACKBONE_POOLERS`` at the top of its backbone (see there): ``["bert.pooler",
    "classifier"]`` for BERT, ``["score"]`` for Llama."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    names = []
    for name, child in model.named_children():
        if child is backbone:
            if with_pooler:
                names += [f"{name}.{sub}" for sub, module in child.named_children()
                          if sub in BACKBONE_POOLERS and _has_parameters(module)]
        elif _has_parameters(child):
            names.append(name)
    return names


def resolve_modules_to_save(model: nn.Module, spec: list[str] | None) -> list[str]:
    """Full names of the modules trained in full. ``None``: a classifier's ``classification_modules``
    (its head and its backbone's pooler), nothing for other models."""
    if spec is None:
        return classification_modules(model) if is_classification_model(model) else []
    names = [name for name, _ in model.named_modules() if name]
    missing = [e for e in spec if not any(_matches_name(n, e) for n in names)]
    if missing:
        raise TargetModulesNotFoundError(
            f"modules_to_save {missing!r} matched no module of the model", missing=missing
        )
    found = [n for n in names if any(_matches_name(n, e) for e in spec)]
    # keep only outermost matches: a saved module carries its children
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def fused_targets(names: list[str]) -> list[str]:
    return [n for n in names if n.rsplit(".", 1)[-1] in FUSED_PROJECTION_NAMES]
