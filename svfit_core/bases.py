"""The basis store: each base weight's SVD triplets (U_r, s_r, V_r), computed once and kept by content.

A basis is addressed by what determines it: the base weight's hash (``weight_sha256``, equal for a bf16
checkpoint and its fp32 upcast), its layout, and the rule that selects the trained triplets (rank, energy,
bottom or top). Every job, checkpoint, artifact and serving process of a base then uses the same bases,
computed once: a second job on the same base skips the SVD, adapters trained on different hosts share one
basis when served, and an adapter only needs σ and the key of each basis (kilobytes, not the 2–3× the
model that U and V take at r = k).

The library defines the interface and a directory-backed store; the service backs it with its object
store (api/core/basis_store.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from .config import SVFitConfig
from .rank import truncated_svd

# Bump when what a key names changes (the SVD routine, the selection rule), so old entries are not reused.
BASIS_FORMAT_VERSION = 1


class BasisStore(Protocol):
    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The stored tensors ``U`` (m, r), ``s`` (r,), ``V`` (n, r) for ``key``, or None."""

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep ``tensors`` under ``key``; a concurrent writer of the same key writes the same content."""


class DirectoryBasisStore:
    """Bases as ``<key>.safetensors`` files in one directory, each written atomically."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        return load_file(str(path)) if path.is_file() else None

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        part = path.with_name(f"{path.name}.{os.getpid()}.part")
        save_file(tensors, str(part))
        os.replace(part, path)


def basis_key(weight_hash: str, transposed: bool, config: SVFitConfig) -> str:
    """The content address of the bases ``config`` selects from a weight with sha256 ``weight_hash``."""
    rule = {
        "version": BASIS_FORMAT_VERSION,
        "weight": weight_hash,
        "layout": "conv1d" if transposed else "linear",
        "rank": config.rank,
        "energy": config.energy,
        "energy_measure": config.energy_measure if config.energy is not None else None,
        "selection": "bottom" if config.train_bottom else "top",
    }
    return hashlib.sha256(json.dumps(rule, sort_keys=True).encode()).hexdigest()


def stored_or_computed(
    weight: torch.Tensor, key: str, config: SVFitConfig, store: BasisStore | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, s_r, V_r) of ``weight`` (out, in) in float32: from ``store`` when it holds ``key``, else by SVD on
    the weight's device (then kept in ``store``)."""
    stored = store.load(key) if store is not None else None
    if stored is not None:
        device = weight.device
        return stored["U"].to(device), stored["s"].to(device), stored["V"].to(device)
    u, s, v = truncated_svd(weight, config)  # (m, r), (r,), (n, r)
    if store is not None:
        store.save(key, {name: t.detach().to("cpu").contiguous() for name, t in (("U", u), ("s", s), ("V", v))})
    return u, s, v
