"""Baselines (LoRA, PiSSA, full, head-only) through the same loop, and the artifacts every method can be
downloaded as: each format reproduces the trained model's outputs, and a format the method cannot produce
is refused with a typed error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from svfit_core.training.outputs import ArtifactFormatUnavailable, load_trained_model, write_artifact
from svfit_core.loading import load_base_model
from svfit_core.training.methods import get_method
from svfit_core.serialization import load_svfit_adapter
from svfit_core.training import PeftSpec, TrainConfig, run_training
from tests.svfit_core.test_training import CHAT, Recorder

OVERFIT_CHAT = CHAT[:4]
OVERFIT_PAIRS = [
    {"text": "the movie is good", "label": 0},
    {"text": "the food is bad", "label": 1},
    {"text": "the book is great", "label": 0},
    {"text": "the film is terrible", "label": 1},
]
# One batch holds the whole set, so every step sees the same data and the loss must fall.
OVERFIT = TrainConfig(n_epochs=6, batch_size=4, warmup_ratio=0.0, seed=0)


@pytest.fixture(scope="module")
def llama(tiny_case_factory) -> Path:
    return tiny_case_factory("llama", "causal").path


@pytest.fixture(scope="module")
def llama_cls(tiny_case_factory) -> Path:
    # Not BERT: a random tiny BERT's [CLS] state barely depends on the input, so nothing learns fast on it;
    # Llama classifies from the last token, which differs between the examples.
    return tiny_case_factory("llama", "classification").path


def _run(path, examples, peft, out, **config):
    recorder = Recorder()
    config = TrainConfig(**{**OVERFIT.__dict__, **config})
    result = run_training(path, examples, None, peft, config, out, recorder)
    assert result.ended_by == "completion"
    return result, recorder


@pytest.fixture(scope="module")
def runs(llama, llama_cls, tmp_path_factory) -> dict:
    """One short overfit run per method (module-scoped: the artifact tests reuse them)."""
    tmp = tmp_path_factory.mktemp("baselines")
    return {
        "svfit": _run(llama, OVERFIT_CHAT, PeftSpec(), tmp / "svfit", learning_rate=5e-2),
        "svfit_cls": _run(llama_cls, OVERFIT_PAIRS, PeftSpec(rank=8), tmp / "svfit_cls", learning_rate=5e-2),
        "lora": _run(llama, OVERFIT_CHAT, PeftSpec(method="lora", rank=4), tmp / "lora", learning_rate=1e-2,
                     gradient_checkpointing=True),
        "pissa": _run(llama, OVERFIT_CHAT, PeftSpec(method="pissa", rank=4), tmp / "pissa", learning_rate=1e-2,
                      checkpoint_every=6),
        "full": _run(llama, OVERFIT_CHAT, PeftSpec(method="full"), tmp / "full", learning_rate=1e-3),
        "head_only": _run(llama_cls, OVERFIT_PAIRS, PeftSpec(method="head_only"), tmp / "head_only",
                          learning_rate=1e-2),
    }


@pytest.mark.parametrize("method", ["svfit", "svfit_cls", "lora", "pissa", "full", "head_only"])
def test_every_method_reduces_the_loss(runs, method):
    _, rec = runs[method]
    assert rec.losses[-1] < rec.losses[0] - 1e-3, rec.losses


def test_trainable_parameter_counts(runs):
    assert runs["svfit"][1].info["trainable_params"] == 96  # 2 layers · (32 + 16) singular values
    # LoRA r=4 on q (32→32) and v (32→16): 4 · (32 + 32) + 4 · (32 + 16) per layer.
    assert runs["lora"][1].info["trainable_params"] == 2 * (4 * 64 + 4 * 48)
    head = runs["head_only"][1].info
    assert head["trainable_params"] == 32 * 2 and head["label_names"] == ["0", "1"]  # Llama's score: no bias


# -- artifacts -------------------------------------------------------------------------------------------


def _ids(tokenizer):
    return tokenizer(["the movie is good", "what is the food"], return_tensors="pt", padding=True)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _reference(base, adapter_dir):
    model, tokenizer, meta = load_trained_model(base, adapter_dir)
    batch = {k: v for k, v in _ids(tokenizer).items() if k != "token_type_ids"}
    return _logits(model, batch), batch, meta


def test_svfit_exports_all_three_formats(runs, llama, tmp_path):
    adapter = runs["svfit"][0].adapter_dir
    reference, batch, _ = _reference(llama, adapter)

    native = write_artifact(llama, adapter, "svfit", tmp_path / "native")
    base, _ = load_base_model(llama, "causal")
    assert torch.allclose(_logits(load_svfit_adapter(base, native).eval(), batch), reference, atol=1e-6)

    lora = write_artifact(llama, adapter, "peft_lora", tmp_path / "lora")
    base, _ = load_base_model(llama, "causal")
    assert torch.allclose(_logits(PeftModel.from_pretrained(base, lora).eval(), batch), reference, atol=1e-5)

    merged = write_artifact(llama, adapter, "merged", tmp_path / "merged")
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(merged).eval(), batch), reference, atol=1e-5)
    for folder in (native, lora, merged):
        assert (folder / "manifest.json").is_file() and (folder / "training_meta.json").is_file()
        assert not folder.with_name(folder.name + ".part").exists()


def test_svfit_classifier_merges_with_its_head_and_labels(runs, llama_cls, tmp_path):
    adapter = runs["svfit_cls"][0].adapter_dir
    reference, batch, meta = _reference(llama_cls, adapter)
    assert meta["label_names"] == ["0", "1"]
    merged = write_artifact(llama_cls, adapter, "merged", tmp_path / "m")
    merged = AutoModelForSequenceClassification.from_pretrained(merged)
    assert merged.config.id2label == {0: "0", 1: "1"}
    assert torch.allclose(_logits(merged.eval(), batch), reference, atol=1e-5)


def test_lora_exports_peft_and_merged_but_not_svfit(runs, llama, tmp_path):
    adapter = runs["lora"][0].adapter_dir
    reference, batch, _ = _reference(llama, adapter)
    base, _ = load_base_model(llama, "causal")
    lora = write_artifact(llama, adapter, "peft_lora", tmp_path / "lora")
    assert torch.allclose(_logits(PeftModel.from_pretrained(base, lora).eval(), batch), reference, atol=1e-6)
    merged = write_artifact(llama, adapter, "merged", tmp_path / "merged")
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(merged).eval(), batch), reference, atol=1e-5)
    with pytest.raises(ArtifactFormatUnavailable) as info:
        write_artifact(llama, adapter, "svfit", tmp_path / "native")
    assert info.value.code == "artifact_format_unavailable"


def test_pissa_adapter_is_converted_to_plain_lora_on_the_original_base(runs, llama):
    result, _ = runs["pissa"]
    # The trained PiSSA model, rebuilt from the checkpoint's PiSSA-form state (residual base + A, B) ...
    spec = PeftSpec(method="pissa", rank=4).resolved(["q_proj", "v_proj"])
    base, tokenizer = load_base_model(llama, "causal")
    trained = get_method("pissa").restore(base, spec, [], "causal", result.last_checkpoint).eval()
    batch = {k: v for k, v in _ids(tokenizer).items() if k != "token_type_ids"}
    # ... must match the servable adapter: a rank-2r LoRA loaded onto the unmodified base.
    served, _, _ = load_trained_model(llama, result.adapter_dir)
    assert served.peft_config["default"].r == 8
    assert torch.allclose(_logits(served, batch), _logits(trained, batch), atol=1e-5)


@pytest.mark.parametrize("method", ["full", "head_only"])
def test_full_and_head_only_export_merged_only(runs, llama, llama_cls, method, tmp_path):
    base_path = llama if method == "full" else llama_cls
    adapter = runs[method][0].adapter_dir
    reference, batch, meta = _reference(base_path, adapter)
    merged = write_artifact(base_path, adapter, "merged", tmp_path / "merged")
    auto = AutoModelForCausalLM if meta["task"] == "causal" else AutoModelForSequenceClassification
    assert torch.allclose(_logits(auto.from_pretrained(merged).eval(), batch), reference, atol=1e-6)
    for fmt in ("svfit", "peft_lora"):
        with pytest.raises(ArtifactFormatUnavailable):
            write_artifact(base_path, adapter, fmt, tmp_path / fmt)


# -- mixed precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["svfit", "lora"])
def test_bf16_autocast_path_trains(llama, method, tmp_path):
    # CUDA runs autocast to bf16 by default; the same code path runs on CPU when asked.
    config = dict(bf16=True, max_steps=2, learning_rate=1e-2)
    result, rec = _run(llama, OVERFIT_CHAT, PeftSpec(method=method, rank=4), tmp_path, **config)
    assert rec.info["config"]["bf16"] is True
    assert all(torch.isfinite(torch.tensor(rec.losses)))


# -- resume, for the baselines too -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "pissa", "full", "head_only"])
def test_pause_and_resume_baselines_is_exact(llama, llama_cls, method, tmp_path):
    path, examples = (llama_cls, OVERFIT_PAIRS) if method == "head_only" else (llama, OVERFIT_CHAT)
    spec = PeftSpec(method=method, rank=4 if method in ("lora", "pissa") else None)
    config = TrainConfig(n_epochs=3, batch_size=2, learning_rate=1e-3, seed=3)
    full = Recorder()
    run_training(path, examples, None, spec, config, tmp_path / "full", full)
    first, second = Recorder(stop_after=2), Recorder()
    paused = run_training(path, examples, None, spec, config, tmp_path / "split", first)
    resumed = run_training(path, examples, None, spec, config, tmp_path / "split", second,
                           resume_from=paused.last_checkpoint)
    assert paused.ended_by == "pause" and resumed.ended_by == "completion"
    assert first.losses + second.losses == full.losses
