"""Serving many SVFit adapters of one base model from one copy of it, with one forward per mixed batch.

Every SVFit adapter of a base lives in that base's singular vectors: two adapters with the same targets and
ranks differ only in Δσ = σ − s_r. ``MultiAdapterLinear`` wraps one target layer of a shared base model and
computes, for a batch whose row b uses adapter a(b),

    y_b = x_b Wᵀ + bias + Σ_k ((x_b V_k) ⊙ Δ_k[b]) U_kᵀ

over the bases k in use in the batch (usually one). Δ_k[b] is the row's Δσ laid out in basis k, zero for a
base-model row or a row whose adapter lives in another basis. ``MultiAdapterModel`` owns the registry of
adapters and bases and builds those per-batch Δ matrices (``set_batch``) before each forward.

Bases are shared only when they are the same vectors: an adapter joins an existing basis when its stored
U_r, V_r equal the basis' first r columns (up to a joint sign flip of a column pair, which leaves
u_i Δσ_i v_iᵀ unchanged), after its per-module base-weight hashes matched the loaded base. A lower-rank
adapter is zero-padded into a higher-rank basis of the same SVD; anything else gets a basis of its own.

Adapters this cannot serve (``unshareable_reason``): one that trains whole modules (a classifier's head),
and a banded one (``SVFitConfig.band`` > 0): its update U_r Δ V_rᵀ couples directions, so it is no per-row
Δσ, and its best rank-r' part lives in a rotated basis of its own. The engine serves those on a model of their
own (the library's loader, merged).

Serving rank (SVFIT.md): with ``serving_rank=r'`` each adapter keeps only its r' largest |Δσ_i| per module
(the best rank-r' approximation of its update, exactly) and a batch gathers the union of its rows' kept
columns, so the skinny matmuls cost O(r') instead of O(r).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .bases import BasisStore
from .rank import kept_directions
from .errors import AdapterFormatError, BaseModelMismatchError, ConfigError
from .layer import weight_sha256
from .serialization import WEIGHTS_NAME, compact_bases, read_adapter_config, recorded_precision
from .targets import LINEAR_TYPES

# Stored bases of one SVD compare equal bit for bit; the tolerance only absorbs a base recomputed on other
# hardware whose singular vectors agree up to rounding.
BASIS_ATOL = 1e-4
# Batch compositions whose Δ matrices are kept ready.
PLAN_CACHE_SIZE = 4


def _layout(layer: nn.Module) -> str:
    return "conv1d" if isinstance(layer, Conv1D) else "linear"


def _out_in(layer: nn.Module) -> tuple[int, int]:
    w = layer.weight
    return (w.shape[1], w.shape[0]) if isinstance(layer, Conv1D) else (w.shape[0], w.shape[1])


def unshareable_reason(cfg: dict[str, Any]) -> str | None:
    """Why the SVFit adapter with adapter config ``cfg`` cannot join a shared base copy, or None if it can.
    The engine routes on this before loading anything (serving/lane_manager.py), and ``add_adapter`` refuses
    on it, so the two cannot disagree."""
    if cfg.get("modules_to_save"):
        return f"it trains whole modules {cfg['modules_to_save']}"
    modules = cfg.get("modules", {})
    banded = sorted(name for name, spec in modules.items() if isinstance(spec, dict) and spec.get("band"))
    if banded:
        return f"it trains banded couplings (modules {banded[:3]}{'...' if len(banded) > 3 else ''}), not Δσ alone"
    return None


@dataclass
class Basis:
    """One set of singular vectors of one base weight: U (out, R), V (in, R) float32, in (out, in) layout."""

    u: torch.Tensor
    v: torch.Tensor
    selection: str  # "top" | "bottom": which end of the spectrum the columns came from
    users: int = 0
    _cast: dict = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def cast(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """U, V in the model's dtype, converted once."""
        if dtype not in self._cast:
            self._cast[dtype] = (self.u.to(dtype), self.v.to(dtype))
        return self._cast[dtype]

    def grow(self, u: torch.Tensor, v: torch.Tensor) -> None:
        self.u, self.v = u, v
        self._cast.clear()


@dataclass
class ModuleDelta:
    """An adapter's update on one module: Δσ (r,) float32 on columns [0, r) of the module's basis ``basis``."""

    basis: int
    delta: torch.Tensor
    _dense: dict = field(default_factory=dict, repr=False)

    def dense(self, serving_rank: int | None, width: int) -> torch.Tensor:
        """Δσ laid out over all ``width`` columns of the basis (zeros past r), keeping only the
        ``serving_rank`` largest |Δσ_i| when one is given."""
        key = (serving_rank, width)
        if key not in self._dense:
            out = torch.zeros(width, dtype=torch.float32, device=self.delta.device)
            keep = kept_directions(self.delta, serving_rank)  # the best rank-r' approximation's directions
            out[keep] = self.delta[keep]
            self._dense[key] = out
        return self._dense[key]


@dataclass
class _Term:
    u: torch.Tensor  # (out, q) model dtype
    v: torch.Tensor  # (in, q)
    delta: torch.Tensor  # (batch, q)


class MultiAdapterLinear(nn.Module):
    """y = base_layer(x) + Σ_k ((x V_k) ⊙ Δ_k) U_kᵀ with Δ_k (batch, q_k) set per batch by the owner.

    ``x`` is (batch, ..., in) with batch the leading dimension; with no terms set the layer is exactly the
    base layer. ``bases`` are this module's registered singular-vector sets.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise ConfigError(f"cannot wrap a {type(base_layer).__name__}", code="invalid_target_modules")
        self.base_layer = base_layer
        self.out_features, self.in_features = _out_in(base_layer)
        self.bases: list[Basis | None] = []
        self.terms: list[_Term] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.terms:
            return y
        batch = x.shape[0]
        x3 = x.reshape(batch, -1, self.in_features)  # (B, T, in)
        y3 = y.view(batch, -1, self.out_features)  # (B, T, out), a view: the adds land in y
        for term in self.terms:
            if term.delta.shape[0] != batch:
                raise ValueError(f"batch plan has {term.delta.shape[0]} rows, forward got {batch}")
            xv = torch.matmul(x3, term.v)  # (B, T, q)
            xv.mul_(term.delta.unsqueeze(1))
            y3.view(-1, self.out_features).addmm_(xv.view(-1, xv.shape[-1]), term.u.mT)
        return y

    def extra_repr(self) -> str:
        ranks = [b.rank for b in self.bases if b is not None]
        return f"in_features={self.in_features}, out_features={self.out_features}, bases={ranks}"


@dataclass
class AdapterEntry:
    name: str
    modules: dict[str, ModuleDelta]
    base_weights_sha256: str | None


class MultiAdapterModel:
    """One base model shared by any number of SVFit adapters; a batch mixes them row by row.

    Usage: ``add_adapter(name, adapter_dir)`` for each adapter, then per forward
    ``set_batch([name_or_None per row])`` and call ``model(...)`` as usual; ``None`` is a base-model row.
    The wrapped model is modified in place (its target layers become ``MultiAdapterLinear``s) and stays the
    plain base model for any batch with no adapter rows.

    ``base_hashes``: per-module sha256 of the base weights as the adapters were trained on them, when the
    model was loaded in another dtype than that (hash before casting); otherwise hashed on first use. An
    adapter trained on a base held in bf16 or fp16 is verified against the loaded weights rounded to that.
    ``bases``: the basis store compact adapters' bases are read from (bases.py); without it, or for an entry
    it lacks, their SVD is recomputed.
    """

    def __init__(
        self, model: nn.Module, *, base_hashes: dict[str, str] | None = None, bases: BasisStore | None = None
    ) -> None:
        self.model = model
        self.bases = bases
        self.adapters: dict[str, AdapterEntry] = {}
        self._hashes: dict[str, str] = dict(base_hashes or {})
        self._slots: dict[str, MultiAdapterLinear] = {}
        self._plans: OrderedDict[tuple, dict[str, list[_Term]]] = OrderedDict()

    # -- registry ----------------------------------------------------------------------------------------

    def _slot(self, name: str, spec: dict[str, Any]) -> MultiAdapterLinear:
        """The wrapper of module ``name`` (wrapped on first use), after checking it is what ``spec`` says."""
        if name in self._slots:
            module = self._slots[name].base_layer
        else:
            try:
                module = self.model.get_submodule(name)
            except AttributeError:
                raise BaseModelMismatchError(
                    f"base model has no module {name!r}", module=name, code="module_missing"
                ) from None
        if not isinstance(module, LINEAR_TYPES) or _layout(module) != spec.get("layout"):
            raise BaseModelMismatchError(
                f"module {name!r} is a {type(module).__name__}, adapter expects a {spec.get('layout')} layer",
                module=name, code="module_type_mismatch",
            )
        if list(module.weight.shape) != list(spec.get("weight_shape", [])):
            raise BaseModelMismatchError(
                f"module {name!r} weight shape {list(module.weight.shape)} != adapter's {spec.get('weight_shape')}",
                module=name, code="shape_mismatch",
            )
        precision = recorded_precision(name, spec)
        key = name if precision is None else f"{name}@{precision}"
        if key not in self._hashes:
            self._hashes[key] = weight_sha256(module.weight, precision)
        if self._hashes[key] != spec.get("base_sha256"):
            raise BaseModelMismatchError(
                f"module {name!r} weights differ from the base the adapter was trained on (sha256 mismatch)",
                module=name, code="weight_hash_mismatch",
            )
        if name not in self._slots:
            slot = MultiAdapterLinear(module)
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, slot)
            self._slots[name] = slot
        return self._slots[name]

    def _read_bases(self, slot: MultiAdapterLinear, name: str, spec: dict, tensors: dict, store_bases: bool):
        r = spec.get("rank")
        if not isinstance(r, int) or r < 1:
            raise AdapterFormatError(f"module {name!r} has invalid rank {r!r}")
        if store_bases:
            shapes = {"U": (slot.out_features, r), "V": (slot.in_features, r), "s": (r,)}
            found = {}
            for key, shape in shapes.items():
                t = tensors.get(f"svfit.{name}.{key}")
                if t is None or tuple(t.shape) != shape:
                    raise AdapterFormatError(f"tensor svfit.{name}.{key} is missing or not of shape {shape}")
                found[key] = t.to(torch.float32)
            return found["U"], found["s"], found["V"]
        u, s, v = compact_bases(slot.base_layer, name, spec, self.bases)
        return u.to(torch.float32), s.to(torch.float32), v.to(torch.float32)

    @staticmethod
    def _matches(basis: Basis, u: torch.Tensor, v: torch.Tensor) -> bool:
        """True when (u, v) are basis columns [0, r), each column pair up to a joint sign flip."""
        r = u.shape[1]
        bu, bv = basis.u[:, :r], basis.v[:, :r]
        signs = torch.sign((bu * u).sum(0))
        signs[signs == 0] = 1
        return bool(torch.allclose(u * signs, bu, atol=BASIS_ATOL) and torch.allclose(v * signs, bv, atol=BASIS_ATOL))

    def _place(self, slot: MultiAdapterLinear, u: torch.Tensor, v: torch.Tensor, selection: str) -> int:
        """Index of the basis (u, v) lives in: an existing one, a grown one, or a new one."""
        r = u.shape[1]
        for i, basis in enumerate(slot.bases):
            if basis is None or basis.selection != selection:
                continue
            if r <= basis.rank and (selection == "top" or r == basis.rank) and self._matches(basis, u, v):
                return i
            if selection == "top" and r > basis.rank and self._matches(Basis(u, v, selection), basis.u, basis.v):
                # The new adapter's basis extends this one: every user of it keeps its columns [0, r_old).
                basis.grow(u.contiguous(), v.contiguous())
                self._plans.clear()
                return i
        slot.bases.append(Basis(u.contiguous(), v.contiguous(), selection))
        return len(slot.bases) - 1

    def add_adapter(self, name: str, adapter_dir: str | Path) -> AdapterEntry:
        """Register the SVFit adapter saved in ``adapter_dir`` under ``name`` (replacing one of that name).

        Raises ``BaseModelMismatchError`` when it was trained on other weights, ``AdapterFormatError`` for a
        broken artifact, ``ConfigError`` (code ``not_shareable``) when it trains whole modules (a
        classification head) or is banded, which cannot share a base copy with other adapters
        (``unshareable_reason``).
        """
        cfg = read_adapter_config(adapter_dir)
        reason = unshareable_reason(cfg)
        if reason is not None:
            raise ConfigError(f"adapter {name!r} needs a model of its own: {reason}", code="not_shareable")
        weights = Path(adapter_dir) / WEIGHTS_NAME
        if not weights.is_file():
            raise AdapterFormatError(f"{weights} not found")
        tensors = load_file(str(weights), device="cpu")
        store_bases = bool(cfg.get("store_bases", True))
        # Check every module before touching any basis: a mismatch leaves the registry as it was.
        slots = {m: self._slot(m, spec) for m, spec in cfg["modules"].items()}
        staged = {}
        for module_name, spec in cfg["modules"].items():
            slot = slots[module_name]
            u, s, v = self._read_bases(slot, module_name, spec, tensors, store_bases)
            sigma = tensors.get(f"svfit.{module_name}.sigma")
            if sigma is None or sigma.shape != s.shape:
                raise AdapterFormatError(
                    f"tensor svfit.{module_name}.sigma is missing or not of shape {tuple(s.shape)}"
                )
            staged[module_name] = (u, v, sigma.to(torch.float32) - s, spec.get("selection", "top"))
        if name in self.adapters:
            self.remove_adapter(name)
        modules = {}
        for module_name, (u, v, delta, selection) in staged.items():
            slot = slots[module_name]
            device = slot.base_layer.weight.device
            index = self._place(slot, u.to(device), v.to(device), selection)
            slot.bases[index].users += 1
            modules[module_name] = ModuleDelta(index, delta.to(device))
        entry = AdapterEntry(name, modules, cfg.get("base_weights_sha256"))
        self.adapters[name] = entry
        self._plans.clear()
        return entry

    def remove_adapter(self, name: str) -> None:
        """Forget adapter ``name``; a basis no adapter uses any more is freed."""
        entry = self.adapters.pop(name, None)
        if entry is None:
            return
        for module_name, md in entry.modules.items():
            slot = self._slots[module_name]
            basis = slot.bases[md.basis]
            basis.users -= 1
            if basis.users == 0:
                slot.bases[md.basis] = None  # indices of other bases stay valid
        self._plans.clear()

    def adapter_bytes(self, name: str) -> int:
        return sum(md.delta.numel() * md.delta.element_size() for md in self.adapters[name].modules.values())

    # -- batches -----------------------------------------------------------------------------------------

    def set_batch(self, rows: list[str | None], serving_rank: int | None = None) -> None:
        """Lay out the Δσ of each row's adapter (``None``: base model) for the next forward(s).

        Plans are cached per row composition (a few of them: a decode loop alternates between the running
        batch and the prefill of newcomers), so a loop pays for each composition once.
        """
        key = (tuple(rows), serving_rank)
        plan = self._plans.get(key)
        if plan is None:
            unknown = sorted({r for r in rows if r is not None and r not in self.adapters})
            if unknown:
                raise KeyError(f"adapters not registered: {unknown}")
            plan = {name: self._terms(slot, name, rows, serving_rank) for name, slot in self._slots.items()}
            self._plans[key] = plan
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        for name, slot in self._slots.items():
            slot.terms = plan.get(name, [])

    def clear_batch(self) -> None:
        """Back to the plain base model for every row."""
        for slot in self._slots.values():
            slot.terms = []

    def _terms(self, slot: MultiAdapterLinear, module_name: str, rows: list[str | None], serving_rank) -> list[_Term]:
        dtype = slot.base_layer.weight.dtype
        deltas = [
            self.adapters[adapter].modules.get(module_name) if adapter is not None else None for adapter in rows
        ]
        terms = []
        for index, basis in enumerate(slot.bases):
            if basis is None or not any(md is not None and md.basis == index for md in deltas):
                continue
            zeros = torch.zeros(basis.rank, dtype=torch.float32, device=basis.u.device)
            full = torch.stack([
                md.dense(serving_rank, basis.rank) if md is not None and md.basis == index else zeros for md in deltas
            ])  # (batch, R)
            # Only columns some row actually moves cost anything: the union of the rows' kept columns.
            columns = full.any(0).nonzero().squeeze(1)
            q = columns.numel()
            if q == 0:
                continue
            u, v = basis.cast(dtype)
            if int(columns[-1]) + 1 == q:  # a prefix [0, q): slice rather than gather a copy
                terms.append(_Term(u[:, :q], v[:, :q], full[:, :q].to(dtype)))
            else:
                terms.append(_Term(u[:, columns].contiguous(), v[:, columns].contiguous(), full[:, columns].to(dtype)))
        return terms
