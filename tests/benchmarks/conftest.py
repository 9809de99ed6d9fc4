"""What the benchmark tests share: a tiny chat Llama standing in for SmolLM2, and SST-2 standing in as eight
lines of two reviews, so one run of a benchmark trains and scores in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import quality_llm
from testkit.tiny_models import build_tiny

TINY_SST2 = [{"text": "good movie", "label": 1}, {"text": "bad film", "label": 0}] * 4


@pytest.fixture
def tiny_sst2(tmp_path, monkeypatch) -> Path:
    """The tiny Llama's folder, with `quality_llm` reading `TINY_SST2` for every split of every task."""
    monkeypatch.setattr(quality_llm, "load_split", lambda task, split: TINY_SST2)
    monkeypatch.setattr(quality_llm, "label_names", lambda task: ["negative", "positive"])
    return build_tiny("llama", "causal", tmp_path / "base")
