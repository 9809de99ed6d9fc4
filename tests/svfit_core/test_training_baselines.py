"""Baselines (LoRA, PiSSA, full, head-only) through the same loop, and the artifacts every method can be
downloaded as: each format reproduces the trained model's outputs, and a format the method cannot produce
is refused with a typed error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from svfit_core.training.outputs import ArtifactFormatUnavailable, load_trained_model, write_artifact
from svfit_core.loading import load_base_model
from svfit_core.targets import classification_modules
from svfit_core.training.methods import attention_targets, get_method, setup_method
from svfit_core.serialization import load_svfit_adapter
from svfit_core.training import PeftSpec, TrainConfig, run_training
from tests.svfit_core.test_training import CHAT, SVFIT_QV, Recorder

OVERFIT_CHAT = CHAT[:4]
OVERFIT_PAIRS = [
    {"text": "the movie is good", "label": 0},
    {"text": "the food is bad", "label": 1},
    {"text": "the book is great", "label": 0},
    {"text": "the film is terrible", "label": 1},
]
# One batch holds the whole set, so every step sees the same data and the loss must fall.
OVERFIT = TrainConfig(n_epochs=6, batch_size=4, warmup_ratio=0.0, seed=0)
# The adapter methods' runs adapt Llama's q and v projections, named so the counts below do not follow the
# service's default targets.
QV = ["q_proj", "v_proj"]


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
        "svfit": _run(llama, OVERFIT_CHAT, SVFIT_QV, tmp / "svfit", learning_rate=5e-2),
        "svfit_cls": _run(llama_cls, OVERFIT_PAIRS, PeftSpec(rank=8, target_modules=QV), tmp / "svfit_cls",
                          learning_rate=5e-2),
        "lora": _run(llama, OVERFIT_CHAT, PeftSpec(method="lora", rank=4, target_modules=QV), tmp / "lora",
                     learning_rate=1e-2, gradient_checkpointing=True),
        "pissa": _run(llama, OVERFIT_CHAT, PeftSpec(method="pissa", rank=4, target_modules=QV), tmp / "pissa",
                      learning_rate=1e-2, checkpoint_every=6),
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
    result, rec = runs["pissa"]
    # The trained PiSSA model, rebuilt from the checkpoint's PiSSA-form state (residual base + A, B) with the
    # spec the run resolved ...
    spec = PeftSpec.from_dict(rec.info["peft"])
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


# -- a BERT classifier's pooler --------------------------------------------------------------------------
# BERT's `bert.pooler` (dense + tanh between encoder and head) trains in full with the head under svfit, lora
# and pissa; full trains it with the body, as it always did; head_only stays a probe of the encoder as
# pretrained and leaves it frozen.

POOLER = "bert.pooler.dense.weight"


@pytest.fixture(scope="module")
def bert_cls(tiny_case_factory) -> Path:
    return tiny_case_factory("bert", "classification").path


@pytest.fixture(scope="module")
def bert_runs(bert_cls, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("pooler")
    return {
        method: _run(bert_cls, OVERFIT_PAIRS, PeftSpec(method=method, rank=None if method == "head_only" else 4),
                     tmp / method, max_steps=3, learning_rate=1e-2)
        for method in ("svfit", "lora", "head_only")
    }


def _saved_modules(method: str, adapter_dir: Path) -> list[str]:
    if method == "head_only":
        return json.loads((adapter_dir / "head_config.json").read_text())["head_modules"]
    return json.loads((adapter_dir / "adapter_config.json").read_text())["modules_to_save"]


@pytest.mark.parametrize("method", ["svfit", "lora", "head_only"])
def test_the_pooler_trains_with_the_head_except_for_head_only(bert_runs, bert_cls, method, tmp_path):
    result, rec = bert_runs[method]
    trains_pooler = method != "head_only"
    assert ("bert.pooler" in _saved_modules(method, result.adapter_dir)) == trains_pooler
    # The merged artifact carries the trained pooler and is the model the adapter serves.
    merged = write_artifact(bert_cls, result.adapter_dir, "merged", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    base, _ = load_base_model(bert_cls, "classification", num_labels=2)
    assert (not torch.equal(merged.state_dict()[POOLER], base.state_dict()[POOLER])) == trains_pooler
    reference, batch, _ = _reference(bert_cls, result.adapter_dir)
    assert torch.allclose(_logits(merged, batch), reference, atol=1e-5)
    if method == "head_only":
        assert rec.info["trainable_params"] == 32 * 2 + 2  # the classifier alone


@pytest.mark.parametrize("method", ["svfit", "lora"])
def test_peft_export_of_a_classifier_restores_its_pooler(bert_runs, bert_cls, method, tmp_path):
    result, _ = bert_runs[method]
    reference, batch, _ = _reference(bert_cls, result.adapter_dir)
    lora = write_artifact(bert_cls, result.adapter_dir, "peft_lora", tmp_path / "lora")
    assert POOLER in {k.removeprefix("base_model.model.") for k in load_file(lora / "adapter_model.safetensors")}
    base, _ = load_base_model(bert_cls, "classification", num_labels=2)
    peft_model = PeftModel.from_pretrained(base, lora).eval()
    assert torch.allclose(_logits(peft_model, batch), reference, atol=1e-5)


@pytest.mark.parametrize("method", ["svfit", "lora", "full", "head_only"])
def test_the_pooler_learns_at_the_head_learning_rate(bert_cls, method):
    model, _ = load_base_model(bert_cls, "classification", num_labels=2)
    heads = classification_modules(model, with_pooler=get_method(method).head_includes_pooler)
    spec = PeftSpec(method=method, rank=4 if method in ("svfit", "lora") else None).resolved(attention_targets(model))
    _, groups = setup_method(model, spec, heads, "classification", lr=1e-3, head_lr=7e-3, weight_decay=0.01)
    rates = {name: (group["name"], group["lr"]) for group in groups for name in group["param_names"]}
    pooler = {rate for name, rate in rates.items() if ".pooler." in name}
    assert {rate for name, rate in rates.items() if "classifier." in name} == {("head", 7e-3)}
    expected = {"head_only": set(), "full": {("full", 1e-3)}}  # frozen; with the body, as it always trained
    assert pooler == expected.get(method, {("head", 7e-3)})


@pytest.mark.parametrize("method", ["svfit", "lora"])
@pytest.mark.parametrize("targets", ["all-linear", ["dense"]], ids=["all-linear", "dense"])
def test_the_pooler_is_never_a_target(bert_cls, method, targets):
    model, _ = load_base_model(bert_cls, "classification", num_labels=2)
    spec = PeftSpec(method=method, rank=4, target_modules=targets).resolved(None)
    model = get_method(method).prepare(model, spec, classification_modules(model), "classification")
    pooler = {name: p.requires_grad for name, p in model.named_parameters() if ".pooler." in name}
    assert not [name for name in pooler if "sigma" in name or "lora_" in name], list(pooler)
    assert any(pooler.values())  # it trains whole instead
    assert any("sigma" in name or "lora_" in name for name, _ in model.named_parameters())


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
