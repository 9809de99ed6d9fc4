"""Assertions shared by the worker tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    assert tensors, f"no safetensors in {folder}"
    return tensors


def assert_same_adapter(a: Path, b: Path) -> None:
    """Bit-for-bit equal adapters (torch.equal on every tensor of every safetensors file)."""
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
