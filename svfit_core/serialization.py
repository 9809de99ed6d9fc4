"""The native adapter artifact: ``adapter_config.json`` + ``adapter_model.safetensors``, save and load.

Load is the exact mirror of save and refuses a base model the adapter was not trained on: module names,
weight shapes and per-module sha256 hashes of the base weights are checked before anything is attached.
JSON and safetensors only; nothing is ever unpickled.

A banded adapter (``SVFitConfig.band`` > 0) also stores each module's packed off-diagonals as
``svfit.<module>.band`` and the module's band as ``modules.<module>.band``; an adapter without them (every
adapter from before the banded variant) is band 0.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .bases import BasisStore, stored_or_computed
from .config import SVFitConfig
from .errors import AdapterFormatError, BaseModelMismatchError
from .layer import SVFitLayer, band_size, effective_band, weight_sha256
from .model import SVFitModel, attach_layers, check_not_injected
from .targets import FUSED_PROJECTION_MODE, LINEAR_TYPES, check_adaptable, fused_targets

FORMAT_VERSION = 1
METHOD = "svfit"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# A module's "base_dtype": the half precision its run held the base weight in, absent for fp32. Its
# ``base_sha256`` is then of the weight rounded to that dtype, and a verifier rounds before hashing.
BASE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def base_model_info(model: nn.Module) -> dict[str, Any]:
    """What identifies the base model: its hub id or path, revision when known, type and class."""
    cfg = getattr(model, "config", None)
    return {
        "name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "revision": getattr(cfg, "_commit_hash", None),
        "model_type": getattr(cfg, "model_type", None),
        "architectures": getattr(cfg, "architectures", None) or [type(model).__name__],
    }


def combined_hash(module_hashes: dict[str, str]) -> str:
    """One sha256 over the per-module hashes, in name order."""
    h = hashlib.sha256()
    for name in sorted(module_hashes):
        h.update(f"{name}:{module_hashes[name]}\n".encode())
    return h.hexdigest()


def _layout(layer: nn.Module) -> str:
    return "linear" if isinstance(layer, nn.Linear) else "conv1d"


def recorded_precision(name: str, spec: dict[str, Any]) -> torch.dtype | None:
    """The dtype module ``name``'s base hash was taken at (None: the weight's own values)."""
    value = spec.get("base_dtype")
    if value is None:
        return None
    if value not in BASE_DTYPES:
        raise AdapterFormatError(f"module {name!r} has unknown base_dtype {value!r}")
    return BASE_DTYPES[value]


def _base_dtype_entry(weight: torch.Tensor) -> dict[str, str]:
    names = {dtype: name for name, dtype in BASE_DTYPES.items()}
    return {"base_dtype": names[weight.dtype]} if weight.dtype in names else {}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # clone: safetensors refuses tensors that share storage (e.g. slices of one SVD)
    return t.detach().to("cpu").contiguous().clone()


def adapter_tensors(svfit_model: SVFitModel) -> dict[str, torch.Tensor]:
    """σ per layer (+ its off-diagonals when banded, + U, V, s unless compact) and the full state of each
    saved module."""
    store_bases = stores_bases(svfit_model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in svfit_model.svfit_layers().items():
        tensors[f"svfit.{name}.sigma"] = _cpu(layer.sigma)
        if layer.band:
            tensors[f"svfit.{name}.band"] = _cpu(layer.band_weights)
        if store_bases:
            tensors[f"svfit.{name}.U"] = _cpu(layer.U)
            tensors[f"svfit.{name}.V"] = _cpu(layer.V)
            tensors[f"svfit.{name}.s"] = _cpu(layer.s)
    for name in svfit_model.modules_to_save:
        for key, value in svfit_model.model.get_submodule(name).state_dict().items():
            tensors[f"modules_to_save.{name}.{key}"] = _cpu(value)
    return tensors


def stores_bases(svfit_model: SVFitModel) -> bool:
    """Whether its adapter carries U, V and s: unless configured compact, or its bases are in a basis store
    (then the adapter names them by key, and whoever loads it reads them from that store)."""
    return svfit_model.svfit_config.store_bases and not svfit_model.basis_keys


def adapter_config(svfit_model: SVFitModel) -> dict[str, Any]:
    cfg = svfit_model.svfit_config
    layers = svfit_model.svfit_layers()
    hashes = {name: svfit_model.base_hashes[name] for name in layers}
    return {
        "format_version": FORMAT_VERSION,
        "method": METHOD,
        "base_model": base_model_info(svfit_model.model),
        "base_weights_sha256": combined_hash(hashes),
        "options": cfg.to_dict(),
        "target_modules": sorted(layers),
        "fused_projections": {"mode": FUSED_PROJECTION_MODE, "modules": fused_targets(sorted(layers))},
        "modules": {
            name: {
                "rank": layer.rank,
                **({"band": layer.band} if layer.band else {}),
                "layout": _layout(layer.base_layer),
                "weight_shape": list(layer.base_layer.weight.shape),
                "selection": "bottom" if cfg.train_bottom else "top",
                "base_sha256": hashes[name],
                **_base_dtype_entry(layer.base_layer.weight),
                **({"basis": svfit_model.basis_keys[name]} if name in svfit_model.basis_keys else {}),
            }
            for name, layer in layers.items()
        },
        "modules_to_save": list(svfit_model.modules_to_save),
        "store_bases": stores_bases(svfit_model),
    }


def _write_atomic(path: Path, write) -> None:
    part = path.with_name(path.name + ".part")
    write(part)
    os.replace(part, path)  # a reader never sees a half-written file


def save_svfit_adapter(svfit_model: SVFitModel, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(svfit_model)
    config = adapter_config(svfit_model)
    metadata = {"format": "pt", "method": METHOD}
    _write_atomic(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=metadata))
    _write_atomic(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """Parse and sanity-check ``adapter_config.json``; raises ``AdapterFormatError``."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{path} not found")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict) or cfg.get("method") != METHOD:
        raise AdapterFormatError(f"{path} is not an SVFit adapter (method {cfg.get('method')!r})")
    version = cfg.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise AdapterFormatError(f"unsupported SVFit adapter format_version {version!r}")
    if not isinstance(cfg.get("modules"), dict) or not isinstance(cfg.get("options"), dict):
        raise AdapterFormatError(f"{path} lacks 'modules' or 'options'")
    return cfg


def _check_base_module(model: nn.Module, name: str, spec: dict[str, Any], verify_hash: bool) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise BaseModelMismatchError(
            f"base model has no module {name!r} (adapter trained on a different architecture?)",
            module=name,
            code="module_missing",
        ) from None
    if not isinstance(module, LINEAR_TYPES) or _layout(module) != spec.get("layout"):
        raise BaseModelMismatchError(
            f"module {name!r} is a {type(module).__name__}, adapter expects a {spec.get('layout')} layer",
            module=name,
            code="module_type_mismatch",
        )
    check_adaptable(name, module)
    if list(module.weight.shape) != list(spec.get("weight_shape", [])):
        raise BaseModelMismatchError(
            f"module {name!r} weight shape {list(module.weight.shape)} != adapter's {spec.get('weight_shape')}",
            module=name,
            code="shape_mismatch",
        )
    if verify_hash and weight_sha256(module.weight, recorded_precision(name, spec)) != spec.get("base_sha256"):
        raise BaseModelMismatchError(
            f"module {name!r} weights differ from the base the adapter was trained on (sha256 mismatch)",
            module=name,
            code="weight_hash_mismatch",
        )
    return module


def _tensor(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise AdapterFormatError(f"{WEIGHTS_NAME} lacks tensor {key!r}")
    if tuple(t.shape) != shape:
        raise AdapterFormatError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def compact_bases(
    module: nn.Module, name: str, spec: dict[str, Any], bases: BasisStore | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, s_r, V_r) of a compact adapter's module (one that stores σ only): the bases its key names in
    ``bases``; without a store (or an entry), the SVD of the (hash-verified) base recomputed, keeping the same
    triplets. Shared by the single-adapter loader and the multi-adapter engine."""
    r = spec["rank"]
    cfg = SVFitConfig(rank=r, train_bottom=spec.get("selection") == "bottom")
    weight = module.weight.detach()
    weight = weight.mT if spec.get("layout") == "conv1d" else weight  # (out, in)
    precision = recorded_precision(name, spec)
    if precision is not None:  # the SVD of the weights the adapter trained on, not of a wider load of them
        weight = weight.to(precision)
    key = spec.get("basis")
    u, s, v = stored_or_computed(weight, key, cfg, bases if key else None)
    if s.numel() != r:
        raise AdapterFormatError(f"module {name!r}: rank {r} exceeds the weight's k = {s.numel()}")
    return u, s, v


def _build_layer(
    module: nn.Module,
    name: str,
    spec: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    store_bases: bool,
    bases: BasisStore | None,
) -> SVFitLayer:
    r = spec.get("rank")
    if not isinstance(r, int) or r < 1:
        raise AdapterFormatError(f"module {name!r} has invalid rank {r!r}")
    sigma = _tensor(tensors, f"svfit.{name}.sigma", (r,))
    band = module_band(name, spec)
    band_weights = _tensor(tensors, f"svfit.{name}.band", (band_size(r, band),)) if band else None
    if not store_bases:
        u, s, v = compact_bases(module, name, spec, bases)
        return SVFitLayer(module, u, s, v, sigma=sigma, band=band, band_weights=band_weights)
    w = module.weight
    out_f, in_f = (w.shape[1], w.shape[0]) if spec.get("layout") == "conv1d" else tuple(w.shape)
    u = _tensor(tensors, f"svfit.{name}.U", (out_f, r))
    v = _tensor(tensors, f"svfit.{name}.V", (in_f, r))
    s = _tensor(tensors, f"svfit.{name}.s", (r,))
    return SVFitLayer(module, u, s, v, sigma=sigma, band=band, band_weights=band_weights)


def module_band(name: str, spec: dict[str, Any]) -> int:
    """Module ``name``'s band from its adapter-config entry: 0 when absent (plain SVFit, older adapters)."""
    band, r = spec.get("band", 0), spec.get("rank")
    if isinstance(band, bool) or not isinstance(band, int) or band != effective_band(band, r):
        raise AdapterFormatError(f"module {name!r} has invalid band {band!r} for rank {r!r}")
    return band


def _load_saved_module(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise BaseModelMismatchError(
            f"base model has no module {name!r} to restore (modules_to_save)", module=name, code="module_missing"
        ) from None
    prefix = f"modules_to_save.{name}."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BaseModelMismatchError(
            f"saved module {name!r} does not fit the base model: {exc}", module=name, code="shape_mismatch"
        ) from exc


def load_svfit_adapter(
    base_model: nn.Module,
    adapter_dir: str | Path,
    *,
    is_trainable: bool = False,
    verify_base: bool = True,
    bases: BasisStore | None = None,
) -> SVFitModel:
    """Attach a saved SVFit adapter to a fresh ``base_model`` (modified in place) and return the wrapper.

    Raises ``BaseModelMismatchError`` naming the first mismatching module (missing, other type, other
    shape, other weights), ``AdapterFormatError`` for a broken artifact. ``verify_base=False`` skips the
    hash check (shapes are still checked). With ``is_trainable=False`` σ and the saved modules are frozen.
    ``bases``: the basis store a compact adapter's bases are read from (else its SVD is recomputed).
    """
    cfg = read_adapter_config(adapter_dir)
    weights = Path(adapter_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterFormatError(f"{weights} not found")
    check_not_injected(base_model)
    store_bases = bool(cfg.get("store_bases", True))
    modules = {
        name: _check_base_module(base_model, name, spec, verify_base) for name, spec in cfg["modules"].items()
    }
    tensors = load_file(str(weights), device="cpu")
    layers = {
        name: _build_layer(module, name, cfg["modules"][name], tensors, store_bases, bases)
        for name, module in modules.items()
    }
    heads = list(cfg.get("modules_to_save") or [])
    for name in heads:
        _load_saved_module(base_model, name, tensors)
    hashes = {name: spec.get("base_sha256") for name, spec in cfg["modules"].items()}
    svfit_model = attach_layers(base_model, SVFitConfig.from_dict(cfg["options"]), layers, heads, hashes)
    if bases is not None:
        # Saved again (a resumed run's checkpoints), it names the same bases.
        svfit_model.basis_keys = {name: spec["basis"] for name, spec in cfg["modules"].items() if spec.get("basis")}
    if not is_trainable:
        for p in svfit_model.parameters():
            p.requires_grad_(False)
    return svfit_model
