"""Exports for serving stacks that do not know SVFit: a standard PEFT LoRA adapter and a merged model.

The LoRA export is exact: ΔW = U_r diag(Δσ) V_rᵀ = B A with B = U_r diag(Δσ) (out, r), A = V_rᵀ (r, in) and
lora_alpha = r (scale 1). Neither export modifies the ``SVFitModel``.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import ConfigError, NonFiniteMergeError, SVFitError
from .layer import SVFitLayer
from .model import SVFitModel
from .serialization import base_model_info
from .targets import is_classification_model

PEFT_PREFIX = "base_model.model."


def _padded_rank(r: int, allowed: list[int] | None, name: str) -> int:
    if not allowed:
        return r
    i = bisect.bisect_left(allowed, r)
    if i == len(allowed):
        raise ConfigError(
            f"module {name!r} has rank {r}, above every allowed LoRA rank {allowed}", code="rank_not_allowed"
        )
    return allowed[i]


def lora_factors(layer: SVFitLayer, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) float32 with B A = ΔW; rows/columns past r are zero padding."""
    r = layer.rank
    rank = rank or r
    d = layer.delta_sigma().detach().to(torch.float32)
    a = torch.zeros(rank, layer.in_features, dtype=torch.float32, device=d.device)
    b = torch.zeros(layer.out_features, rank, dtype=torch.float32, device=d.device)
    a[:r] = layer.V.mT
    b[:, :r] = layer.U * d
    return a.cpu(), b.cpu()


def _task_type(model: nn.Module) -> str | None:
    if is_classification_model(model):
        return "SEQ_CLS"
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return None


def export_peft_lora(
    svfit_model: SVFitModel, out_dir: str | Path, allowed_ranks: list[int] | None = None
) -> Path:
    """Write a HF PEFT LoRA adapter equivalent to ``svfit_model`` (``PeftModel.from_pretrained`` loads it).

    ``allowed_ranks``: ranks a server accepts (e.g. vLLM's ``max_lora_rank`` steps); each module's rank is
    padded with zeros up to the next allowed value. Per-module ranks go to ``rank_pattern``/``alpha_pattern``
    when they differ; GPT-2 ``Conv1D`` layers set ``fan_in_fan_out``; the saved head goes to
    ``modules_to_save``.
    """
    from peft import LoraConfig  # only this export needs peft

    layers = svfit_model.svfit_layers()
    allowed = sorted(set(allowed_ranks)) if allowed_ranks else None
    if allowed and allowed[0] < 1:
        raise ConfigError(f"allowed_ranks must be positive, got {allowed_ranks}", code="rank_not_allowed")
    layouts = {layer.transposed for layer in layers.values()}
    if len(layouts) > 1:
        # PEFT's fan_in_fan_out is one flag per adapter
        raise SVFitError(
            "cannot export a mix of Linear and Conv1D targets as one LoRA adapter", code="mixed_layouts"
        )

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in layers.items():
        ranks[name] = _padded_rank(layer.rank, allowed, name)
        a, b = lora_factors(layer, ranks[name])
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    for name in svfit_model.modules_to_save:
        for key, value in svfit_model.model.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().cpu().contiguous().clone()

    default_r = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as regexes against the module name's tail; escape the dots
    pattern = {re.escape(n): r for n, r in ranks.items() if r != default_r}
    info = base_model_info(svfit_model.model)
    lora_config = LoraConfig(
        r=default_r,
        lora_alpha=default_r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(layers),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=bool(layouts == {True}),
        modules_to_save=list(svfit_model.modules_to_save) or None,
        task_type=_task_type(svfit_model.model),
        base_model_name_or_path=info["name_or_path"],
        revision=info["revision"],
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora_config.save_pretrained(str(out))
    return out


def merged_state_dict(svfit_model: SVFitModel) -> dict[str, torch.Tensor]:
    """The wrapped model's state dict with every SVFit layer folded into a plain weight, original names.

    Built from fresh tensors for the adapted weights; the model itself is not touched.
    """
    state: dict[str, Any] = dict(svfit_model.model.state_dict(keep_vars=False))
    for name, layer in svfit_model.svfit_layers().items():
        for key in ("sigma", "U", "V", "s"):
            state.pop(f"{name}.{key}", None)
        weight = state.pop(f"{name}.base_layer.weight")
        if not layer.merged:
            merged = weight.to(torch.float32) + layer.get_delta_weight()
            if not torch.isfinite(merged).all():
                raise NonFiniteMergeError(
                    f"merging SVFit layer {name} would produce non-finite weights", module=name
                )
            weight = merged.to(weight.dtype)
        state[f"{name}.weight"] = weight
        if f"{name}.base_layer.bias" in state:
            state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return state


def export_merged(svfit_model: SVFitModel, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save the merged model as a plain transformers checkpoint (safetensors) plus ``tokenizer``.

    ``AutoModel*.from_pretrained(out_dir)`` reloads it with the adapted outputs; the ``SVFitModel`` stays
    usable (nothing is merged in place).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    svfit_model.model.save_pretrained(str(out), state_dict=merged_state_dict(svfit_model))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    # Breadcrumb for provenance; transformers ignores unknown files.
    (out / "svfit_merge.json").write_text(
        json.dumps({"method": "svfit", "base_model": base_model_info(svfit_model.model),
                    "ranks": svfit_model.ranks}, indent=2) + "\n"
    )
    return out
