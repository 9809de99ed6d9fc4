"""Exports for serving stacks that do not know SVFit: a standard PEFT LoRA adapter and a merged model.

The LoRA export is exact: ΔW = U_r diag(Δσ) V_rᵀ = B A with B = U_r diag(Δσ) (out, r), A = V_rᵀ (r, in) and
lora_alpha = r (scale 1); a banded layer's ΔW = U_r Δ V_rᵀ goes through the small SVD Δ = P S Qᵀ first, with
B = U_r P S, A = Qᵀ V_rᵀ (``update_directions``). At a serving rank r′ (LoRA servers load ranks up to a limit:
vLLM's is 512) it is the exact best rank-r′ approximation instead, and so is ``truncate_peft_lora`` for an
adapter that already is a PEFT LoRA; both record in ``KEPT_ENERGY_FILE`` the share of the update's squared
Frobenius norm they kept. Neither export modifies the ``SVFitModel``.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import AdapterFormatError, ConfigError, NonFiniteMergeError, SVFitError
from .layer import SVFitLayer
from .rank import coupling_svd, kept_directions
from .model import SVFitModel
from .serialization import base_model_info
from .targets import is_classification_model

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
# Written next to a LoRA export: {"rank": r′ or null, "kept_energy": share, "layers": {module: share}}.
KEPT_ENERGY_FILE = "kept_energy.json"


def _padded_rank(r: int, allowed: list[int] | None, name: str) -> int:
    if not allowed:
        return r
    i = bisect.bisect_left(allowed, r)
    if i == len(allowed):
        raise ConfigError(
            f"module {name!r} has rank {r}, above every allowed LoRA rank {allowed}", code="rank_not_allowed"
        )
    return allowed[i]


def update_directions(layer: SVFitLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L (out, r), g (r,) float32, R (in, r)) with ΔW = L diag(g) Rᵀ (out, in) and L, R orthonormal columns,
    so the largest |g_i| (``kept_directions``) give ΔW's best low-rank parts. Band 0: U_r, Δσ, V_r as stored,
    no SVD. Banded: U_r P, S, V_r Q from Δ = P S Qᵀ (``coupling_svd``), float32."""
    if not layer.band:
        return layer.U, layer.delta_sigma().detach().to(torch.float32), layer.V
    p, s, q = coupling_svd(layer.coupling())
    left = layer.U.to(torch.float64) @ p  # (out, r)
    right = layer.V.to(torch.float64) @ q  # (in, r)
    return left.to(torch.float32), s.to(torch.float32), right.to(torch.float32)


def lora_factors(
    layer: SVFitLayer,
    rank: int | None = None,
    keep: torch.Tensor | None = None,
    directions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) float32 with B A = L[:, keep] diag(g[keep]) R[:, keep]ᵀ for the layer's
    ``update_directions`` (pass them as ``directions`` when already computed), which is ΔW when ``keep`` is
    all r directions (the default); rows/columns past ``len(keep)`` are zero padding."""
    left, d, right = update_directions(layer) if directions is None else directions
    keep = torch.arange(layer.rank, device=d.device) if keep is None else keep
    q = keep.numel()
    rank = rank or q
    a = torch.zeros(rank, layer.in_features, dtype=torch.float32, device=d.device)
    b = torch.zeros(layer.out_features, rank, dtype=torch.float32, device=d.device)
    a[:q] = right[:, keep].mT  # (q, in)
    b[:, :q] = left[:, keep].to(torch.float32) * d[keep]  # (out, q)
    return a.cpu(), b.cpu()


def _kept_energy(rank: int | None, energies: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """The ``KEPT_ENERGY_FILE`` record from per-module (kept, total) squared norms; a module (or an update)
    that is all zero lost nothing, so its share is 1."""
    kept = sum(k for k, _ in energies.values())
    total = sum(t for _, t in energies.values())
    return {
        "rank": rank,
        "kept_energy": kept / total if total > 0 else 1.0,
        "layers": {name: k / t if t > 0 else 1.0 for name, (k, t) in energies.items()},
    }


def read_kept_energy(out_dir: str | Path) -> dict[str, Any]:
    """The ``KEPT_ENERGY_FILE`` record a LoRA export wrote into ``out_dir``."""
    return json.loads((Path(out_dir) / KEPT_ENERGY_FILE).read_text())


def _write_kept_energy(out: Path, record: dict[str, Any]) -> None:
    (out / KEPT_ENERGY_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _pattern_config(ranks: dict[str, int]) -> dict[str, Any]:
    """LoraConfig fields for per-module ranks at scale 1 (lora_alpha = r): the most common rank as the
    default, the others in ``rank_pattern``/``alpha_pattern``."""
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as regexes against the module name's tail; escape the dots
    pattern = {re.escape(n): r for n, r in ranks.items() if r != default_r}
    return {"r": default_r, "lora_alpha": default_r, "rank_pattern": pattern, "alpha_pattern": dict(pattern)}


def _task_type(model: nn.Module) -> str | None:
    if is_classification_model(model):
        return "SEQ_CLS"
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return None


def export_peft_lora(
    svfit_model: SVFitModel,
    out_dir: str | Path,
    allowed_ranks: list[int] | None = None,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a HF PEFT LoRA adapter equivalent to ``svfit_model`` (``PeftModel.from_pretrained`` loads it).

    ``rank``: a serving rank r′; each module with r > r′ keeps its r′ largest |Δσ_i| (a banded module: its r′
    largest singular values of Δ), the best rank-r′ approximation of its update (``kept_directions``); None
    exports every module whole. ``allowed_ranks``:
    ranks a server accepts (e.g. vLLM's ``max_lora_rank`` steps); each module's rank is padded with zeros up
    to the next allowed value. ``dtype``: of the LoRA factors; None: each module's base weight dtype.
    Per-module ranks go to ``rank_pattern``/``alpha_pattern`` when they differ; GPT-2 ``Conv1D`` layers set
    ``fan_in_fan_out``; the saved modules (a classifier's head and pooler) go to ``modules_to_save``, their
    tensors under the names PEFT saves them by (``base_model.model.bert.pooler.dense.weight``). The kept
    share of ‖Δσ‖² (banded: ‖S‖² = ‖ΔW‖²_F), overall and per module, goes to ``KEPT_ENERGY_FILE``
    (``read_kept_energy``).
    """
    from peft import LoraConfig  # only this export needs peft

    layers = svfit_model.svfit_layers()
    allowed = sorted(set(allowed_ranks)) if allowed_ranks else None
    if allowed and allowed[0] < 1:
        raise ConfigError(f"allowed_ranks must be positive, got {allowed_ranks}", code="rank_not_allowed")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be positive, got {rank}", code="invalid_rank")
    layouts = {layer.transposed for layer in layers.values()}
    if len(layouts) > 1:
        # PEFT's fan_in_fan_out is one flag per adapter
        raise SVFitError(
            "cannot export a mix of Linear and Conv1D targets as one LoRA adapter", code="mixed_layouts"
        )

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    energies: dict[str, tuple[float, float]] = {}
    for name, layer in layers.items():
        directions = update_directions(layer)
        delta = directions[1]  # (r,): Δσ, or a banded layer's singular values of Δ
        keep = kept_directions(delta, rank)
        energies[name] = (float(delta[keep].square().sum()), float(delta.square().sum()))
        ranks[name] = _padded_rank(keep.numel(), allowed, name)
        a, b = lora_factors(layer, ranks[name], keep, directions)
        out_dtype = dtype or layer.base_layer.weight.dtype
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.to(out_dtype)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.to(out_dtype)
    for name in svfit_model.modules_to_save:
        for key, value in svfit_model.model.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().cpu().contiguous().clone()

    info = base_model_info(svfit_model.model)
    lora_config = LoraConfig(
        **_pattern_config(ranks),
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
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    lora_config.save_pretrained(str(out))
    _write_kept_energy(out, _kept_energy(rank, energies))
    return out


def _lora_scale(config: Any, module: str, r: int) -> float:
    """PEFT's scale of ``module``'s B A: α/r (α/√r with rsLoRA), α from ``alpha_pattern`` when it names it."""
    alpha = config.lora_alpha
    for key, value in config.alpha_pattern.items():
        # PEFT's own rule (get_pattern_key): a pattern key matches the tail of the module name
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
            break
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def _best_rank(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B′ (out, q), A′ (q, in), s) with B′ A′ the best rank-``rank`` approximation of B A (q = min(rank,
    its rank)) and s all singular values of B A, float64. A thin SVD through the small core: B = Q_b R_b,
    Aᵀ = Q_a R_a, R_b R_aᵀ = U_c S V_cᵀ give B A = (Q_b U_c) S (Q_a V_c)ᵀ with no (out, in) matrix formed."""
    # float64: the core is tiny, and the kept share should not carry float32 rounding
    q_b, r_b = torch.linalg.qr(b.to(torch.float64))  # (out, r), (r, r) for r ≤ out
    q_a, r_a = torch.linalg.qr(a.to(torch.float64).mT)  # (in, r), (r, r) for r ≤ in
    u_c, s, v_ch = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)  # core (r, r)
    q = min(rank, s.numel())
    return (q_b @ u_c[:, :q]) * s[:q], v_ch[:q] @ q_a.mT, s


def truncate_peft_lora(adapter_dir: str | Path, out_dir: str | Path, rank: int | None) -> Path:
    """Write the HF PEFT LoRA adapter in ``adapter_dir`` into ``out_dir`` at rank at most ``rank``.

    When every module's rank is ≤ ``rank`` (or ``rank`` is None) the adapter is copied unchanged. Otherwise
    each module's update scale·B A becomes its best rank-min(r, ``rank``) approximation (``_best_rank``) with
    the scale folded into B (lora_alpha = r, so scale 1), in the adapter's own dtype; other tensors (a
    ``modules_to_save`` head) pass through. Records the kept share of ‖scale·B A‖² in ``KEPT_ENERGY_FILE``.
    """
    from peft import LoraConfig  # only this export needs peft

    src, out = Path(adapter_dir), Path(out_dir)
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be positive, got {rank}", code="invalid_rank")
    tensors = load_file(str(src / PEFT_WEIGHTS))
    config = LoraConfig.from_pretrained(str(src))
    suffix_a, suffix_b = ".lora_A.weight", ".lora_B.weight"
    prefixes = sorted(key[: -len(suffix_a)] for key in tensors if key.endswith(suffix_a))
    others = [k for k in tensors if "lora_" in k and not k.endswith((suffix_a, suffix_b))]
    if not prefixes or others or config.use_dora:
        # DoRA's magnitude vector, LoRA biases and embedding factors are not part of a B A update
        raise AdapterFormatError(f"{src} is not a plain LoRA adapter of linear layers; cannot truncate it")

    out.mkdir(parents=True, exist_ok=True)
    if rank is None or all(tensors[p + suffix_a].shape[0] <= rank for p in prefixes):
        for name in (PEFT_CONFIG, PEFT_WEIGHTS):
            shutil.copy2(src / name, out / name)
        layers = dict.fromkeys((p.removeprefix(PEFT_PREFIX) for p in prefixes), 1.0)
        _write_kept_energy(out, {"rank": rank, "kept_energy": 1.0, "layers": layers})
        return out

    ranks: dict[str, int] = {}
    energies: dict[str, tuple[float, float]] = {}
    for prefix in prefixes:
        name = prefix.removeprefix(PEFT_PREFIX)
        a, b = tensors[prefix + suffix_a], tensors[prefix + suffix_b]  # (r, in), (out, r)
        scale = _lora_scale(config, name, a.shape[0])
        new_b, new_a, s = _best_rank(b.to(torch.float64) * scale, a, rank)
        ranks[name] = new_a.shape[0]
        energies[name] = (float(s[: ranks[name]].square().sum()), float(s.square().sum()))
        tensors[prefix + suffix_a] = new_a.to(a.dtype).contiguous()
        tensors[prefix + suffix_b] = new_b.to(b.dtype).contiguous()
    fields = _pattern_config(ranks)
    for key, value in fields.items():
        setattr(config, key, value)
    config.use_rslora = False  # α = r gives scale 1 under α/r; rsLoRA's α/√r would not be 1
    config.save_pretrained(str(out))
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    _write_kept_energy(out, _kept_energy(rank, energies))
    return out


def merged_state_dict(svfit_model: SVFitModel) -> dict[str, torch.Tensor]:
    """The wrapped model's state dict with every SVFit layer folded into a plain weight, original names.

    Built from fresh tensors for the adapted weights; the model itself is not touched.
    """
    state: dict[str, Any] = dict(svfit_model.model.state_dict(keep_vars=False))
    for name, layer in svfit_model.svfit_layers().items():
        for key in ("sigma", "band_weights", "U", "V", "s"):
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
