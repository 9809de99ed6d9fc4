"""Fixtures for the core tests: tiny checkpoints built once per session, one ``TinyCase`` per table row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from testkit.tiny_models import DEFAULT_TABLE, NUM_LABELS, build_tiny, load_tiny, sample_batch


@dataclass
class TinyCase:
    """One row of the model table: where its checkpoint lies and how to feed it."""

    arch: str
    task: str
    path: Path

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.task}"

    def load(self) -> torch.nn.Module:
        return load_tiny(self.path, self.task)

    def batch(self, seed: int = 0) -> dict[str, torch.Tensor]:
        return sample_batch(batch=2, seq=8, seed=seed)

    def labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.task == "causal":
            return batch["input_ids"]
        return torch.arange(batch["input_ids"].shape[0]) % NUM_LABELS


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_case_factory(tiny_root):
    """``make(arch, task) -> TinyCase``, building each checkpoint at most once per session."""
    built: dict[tuple[str, str], TinyCase] = {}

    def make(arch: str, task: str) -> TinyCase:
        if (arch, task) not in built:
            built[(arch, task)] = TinyCase(arch, task, build_tiny(arch, task, tiny_root))
        return built[(arch, task)]

    return make


@pytest.fixture(params=DEFAULT_TABLE, ids=[f"{a}-{t}" for a, t in DEFAULT_TABLE])
def case(request, tiny_case_factory) -> TinyCase:
    return tiny_case_factory(*request.param)
