"""Smoke test of benchmarks/scale.py: its core function on a tiny Llama shape (seconds), and the shape of the
result it writes: every arm, every target, each target with its five keys."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from benchmarks.scale import ModelShape, Settings, run

# Spelled out here rather than imported: the test fails when the benchmark drops an arm or a target.
ARMS = {"svfit_r64_qv", "svfit_r256_qv", "svfit_rk_qv", "svfit_r64_all", "svfit_r256_all", "svfit_rk_all",
        "lora_r16_qv", "lora_r16_all", "full"}
TARGETS = {
    "peak_svfit_rk_all", "peak_svfit_r256_all", "peak_svfit_rk_qv",
    *(f"checkpoint_{a}" for a in ARMS if a.startswith("svfit")),
    "basis_reuse",
    "step_svfit_r64_all", "step_svfit_r256_all", "step_svfit_rk_all",
    "rule_svfit_r64_all", "rule_svfit_r256_all", "rule_svfit_rk_all",
}
TARGET_KEYS = {"name", "value", "limit", "unit", "met"}
PER_LAYER_KEYS = {"trainable_params", "basis_bytes", "trainable_bytes", "grad_bytes", "optimizer_bytes",
                  "checkpoint_compact_bytes", "checkpoint_self_contained_bytes", "activation_bytes"}
TINY = ModelShape("tiny", "tiny Llama", hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=512, layers=6,
                  tied=False)


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # --quick's settings, with the token counts cut to the tiny shape
        settings = replace(Settings.for_run("cpu", quick=True), act_tokens=64, step_tokens=32, step_rounds=2)
        result = run([TINY], settings, workdir=tmp_path_factory.mktemp("scale"))
    finally:
        torch.set_num_threads(threads)
    return json.loads(json.dumps(result))  # what the result file would hold


@pytest.mark.slow
def test_every_arm_is_reported_with_its_per_layer_figures(payload):
    rows = {a["name"]: a for a in payload["arms"] if a["shape"] == "tiny"}
    assert set(rows) == ARMS
    for row in rows.values():
        assert PER_LAYER_KEYS <= set(row["per_layer"]), row["name"]
        assert {"ms_median", "ratio_to_lora", "rule_ratio_to_lora"} <= set(row["step"])
        assert row["model"]["peak_bytes_ckpt"] > 0 and row["model"]["layers"] == TINY.layers


@pytest.mark.slow
def test_every_target_is_there_with_its_five_keys(payload):
    targets = payload["targets"]
    assert {t["id"] for t in targets} == TARGETS and len(targets) == len(TARGETS)
    for t in targets:
        assert TARGET_KEYS <= set(t), t
        assert isinstance(t["value"], (int, float)) and isinstance(t["limit"], (int, float))
        assert isinstance(t["unit"], str) and isinstance(t["met"], bool)


@pytest.mark.slow
def test_the_figures_order_as_the_method_says(payload):
    rows = {a["name"]: a["per_layer"] for a in payload["arms"] if a["shape"] == "tiny"}
    # A compact checkpoint names its bases; a self-contained one carries them.
    for name in ("svfit_r64_all", "svfit_rk_all"):
        assert rows[name]["checkpoint_compact_bytes"] < rows[name]["checkpoint_self_contained_bytes"]
    assert rows["svfit_r64_all"]["basis_bytes"] < rows["svfit_rk_all"]["basis_bytes"]
    assert rows["svfit_rk_all"]["trainable_params"] < rows["lora_r16_all"]["trainable_params"]
    # Checkpointing keeps one layer input per layer: T x hidden in bf16.
    assert rows["svfit_rk_all"]["activation_bytes"]["ckpt"] == 64 * TINY.hidden * 2
    (shape,) = payload["shapes"]
    assert shape["basis_reuse"]["second_s"] < shape["basis_reuse"]["first_s"]
