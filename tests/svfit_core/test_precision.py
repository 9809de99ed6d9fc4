"""SVFit on a half-precision base, on the CPU: the dtype rule, exact identity at init, bases in the base's
dtype with σ, head and Adam moments in fp32, a frozen base that stays bit for bit, a merge that upcasts once,
and adapters trained on a bf16-rounded base that verify against an fp32 load of the same checkpoint.

The GPU half (the base loaded straight onto the device, no fp32 copy of it there) is in tests/gpu.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from svfit_core import (
    BaseModelMismatchError,
    SVFitConfig,
    inject_svfit,
    load_svfit_adapter,
    save_svfit_adapter,
)
from svfit_core.loading import base_dtype_for, checkpoint_dtype, load_base_model
from svfit_core.multi_adapter import MultiAdapterModel
from svfit_core.training import PeftSpec, TrainConfig, run_training
from svfit_core.training.outputs import load_trained_model
from svfit_core.training.run_config import HyperparameterError
from tests.svfit_core.test_svfit_properties import logits, perturb
from tests.svfit_core.test_training import CHAT, PAIRS, Recorder, train
from testkit.tiny_models import auto_class, build_tiny

CUDA = torch.device("cuda")  # only a name here: base_dtype_for reads its type, nothing runs on it


def load_bf16(case) -> nn.Module:
    return auto_class(case.task).from_pretrained(str(case.path), dtype=torch.bfloat16).eval()


# -- the dtype rule -------------------------------------------------------------------------------------


def _folder(tmp_path: Path, declared: str | None) -> Path:
    folder = tmp_path / f"declares-{declared}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"dtype": declared} if declared else {}))
    return folder


@pytest.mark.parametrize(
    "declared, bf16_native, bf16, trains_base, expected",
    [
        ("float32", True, None, False, torch.bfloat16),
        ("bfloat16", True, None, False, torch.bfloat16),
        ("float16", True, None, False, torch.float16),
        (None, True, None, False, torch.bfloat16),  # declares nothing
        ("float32", False, None, False, torch.float32),  # no native bf16: fp32 rather than emulated bf16
        ("bfloat16", False, None, False, torch.float32),
        ("float16", True, True, False, torch.bfloat16),  # bf16 asked for
        ("bfloat16", True, False, False, torch.float32),  # bf16 refused: fp32 throughout, as before
        ("bfloat16", True, None, True, torch.float32),  # full fine-tuning trains the base itself
    ],
)
def test_auto_base_dtype_on_cuda(tmp_path, monkeypatch, declared, bf16_native, bf16, trains_base, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_native)
    path = _folder(tmp_path, declared)
    assert base_dtype_for(path, "auto", CUDA, bf16=bf16, trains_base=trains_base) == expected


def test_auto_base_dtype_off_cuda_is_fp32_and_explicit_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    path = _folder(tmp_path, "bfloat16")
    assert base_dtype_for(path, "auto", torch.device("cpu")) == torch.float32
    assert base_dtype_for(path, "auto", torch.device("cpu"), bf16=True) == torch.float32
    assert base_dtype_for(path, "float16", torch.device("cpu")) == torch.float16
    assert base_dtype_for(path, "float32", CUDA) == torch.float32


def test_gguf_bases_dequantise_to_bf16_on_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    (tmp_path / "model.gguf").write_bytes(b"")
    assert checkpoint_dtype(tmp_path) is None
    assert base_dtype_for(tmp_path, "auto", CUDA) == torch.bfloat16


@pytest.mark.parametrize(
    "options, param",
    [
        (dict(base_dtype="float64"), "base_dtype"),
        (dict(base_dtype=None), "base_dtype"),
        (dict(base_dtype="bfloat16", bf16=False), "bf16"),
        (dict(base_dtype="float16", bf16=True), "bf16"),
    ],
)
def test_bad_base_dtypes_are_refused(options, param):
    with pytest.raises(HyperparameterError) as info:
        TrainConfig(**options).validate()
    assert info.value.param == param


def test_load_base_model_holds_the_base_in_the_dtype_asked(tiny_case_factory):
    model, _ = load_base_model(tiny_case_factory("llama", "causal").path, "causal", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# -- the layer and the model on a bf16 base ---------------------------------------------------------------


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "bf16-autocast"])
def test_bf16_base_identity_at_init_is_exact(case, autocast):
    base = load_bf16(case)
    adapted = inject_svfit(copy.deepcopy(base), SVFitConfig(target_modules="all-linear"))
    for layer in adapted.svfit_layers().values():
        assert layer.U.dtype == layer.V.dtype == torch.bfloat16
        assert layer.s.dtype == layer.sigma.dtype == torch.float32
    batch = case.batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert torch.equal(logits(adapted, batch), logits(base, batch))


def test_training_a_bf16_base_changes_only_sigma_and_head(case):
    svfit_model = inject_svfit(load_bf16(case), SVFitConfig(target_modules="all-linear"))
    for name in svfit_model.modules_to_save:  # as the loop does: a trained head keeps fp32 weights
        svfit_model.model.get_submodule(name).float()
    trained = {n for n, p in svfit_model.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in svfit_model.state_dict().items()}
    params = [p for p in svfit_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    svfit_model.train()
    for step in range(3):
        batch = case.batch(seed=step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = svfit_model(**batch, labels=case.labels(batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    assert all(p.dtype == torch.float32 for p in params)
    moments = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    after = svfit_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trained  # U, V, s, every base weight and bias: bit for bit as loaded
    frozen = [k for k in after if k not in trained and not k.endswith(".s") and after[k].is_floating_point()]
    assert frozen and all(after[k].dtype == torch.bfloat16 for k in frozen)  # no fp32 copy of anything frozen


def test_merge_of_a_bf16_base_upcasts_once(tiny_case_factory):
    svfit_model = inject_svfit(load_bf16(tiny_case_factory("llama", "causal")), SVFitConfig())
    perturb(svfit_model)
    layers = svfit_model.svfit_layers()
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    deltas = {n: layer.get_delta_weight() for n, layer in layers.items()}
    svfit_model.merge()
    for name, layer in layers.items():
        w, delta_w = weights[name].float(), deltas[name]  # (out, in) each
        assert delta_w.dtype == torch.float32 and delta_w.abs().max() > 0
        exact = w + (layer.U.float() * layer.delta_sigma().detach()) @ layer.V.float().mT
        torch.testing.assert_close(delta_w, exact - w, rtol=1e-5, atol=1e-6)
        merged = layer.base_layer.weight
        assert merged.dtype == torch.bfloat16
        assert torch.equal(merged, (w + delta_w).to(torch.bfloat16))  # one rounding, of the fp32 sum
        torch.testing.assert_close(merged.float(), exact, rtol=2**-8, atol=1e-6)


# -- training runs on a bf16 base -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_classifier_run(tiny_case_factory, tmp_path_factory):
    """Three steps of SVFit + head on the tiny BERT held in bf16, a checkpoint after each."""
    bert = tiny_case_factory("bert", "classification").path
    config = TrainConfig(max_steps=3, batch_size=4, seed=0, checkpoint_every=1, base_dtype="bfloat16")
    out = tmp_path_factory.mktemp("bf16-bert")
    recorder = Recorder()
    result = run_training(bert, PAIRS, None, PeftSpec(rank=4), config, out, recorder)
    return bert, result, recorder


def test_a_bf16_run_keeps_sigma_head_and_adam_moments_fp32(bf16_classifier_run):
    _, result, recorder = bf16_classifier_run
    assert result.ended_by == "completion"
    assert recorder.info["config"]["base_dtype"] == "bfloat16" and recorder.info["config"]["bf16"] is True
    state = load_file(result.last_checkpoint / "training_state.safetensors")
    moments = {k: t for k, t in state.items() if k.startswith("optimizer.")}
    assert moments and all(t.dtype == torch.float32 for t in moments.values())
    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    for key, tensor in adapter.items():
        expected = torch.bfloat16 if key.endswith((".U", ".V")) else torch.float32  # σ, s, the head
        assert tensor.dtype == expected, key
    sigmas = [adapter[k] - adapter[k[: -len("sigma")] + "s"] for k in adapter if k.endswith(".sigma")]
    assert any(d.abs().max() > 0 for d in sigmas)


def test_a_bf16_adapter_verifies_against_an_fp32_load_of_its_base(bf16_classifier_run, tmp_path):
    bert, result, _ = bf16_classifier_run
    modules = json.loads((result.adapter_dir / "adapter_config.json").read_text())["modules"]
    assert {spec["base_dtype"] for spec in modules.values()} == {"bfloat16"}
    # The service's loaders hold the base in fp32; each rounds its weights to bf16 before hashing.
    model, _, _ = load_trained_model(bert, result.adapter_dir)
    assert {layer.base_layer.weight.dtype for layer in model.svfit_layers().values()} == {torch.float32}
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert torch.isfinite(model(**batch).logits).all()
    other = build_tiny("bert", "classification", tmp_path, seed=1)  # same shapes, other weights
    with pytest.raises(BaseModelMismatchError) as info:
        load_trained_model(other, result.adapter_dir)
    assert info.value.code == "weight_hash_mismatch"


def test_a_bf16_adapter_joins_a_multi_adapter_fp32_base(tiny_case_factory, tmp_path):
    llama = tiny_case_factory("llama", "causal")
    svfit_model = inject_svfit(load_bf16(llama), SVFitConfig())
    perturb(svfit_model)
    save_svfit_adapter(svfit_model, tmp_path)
    multi = MultiAdapterModel(llama.load())
    multi.add_adapter("a", tmp_path)
    with pytest.raises(BaseModelMismatchError):
        MultiAdapterModel(auto_class("causal").from_pretrained(
            str(build_tiny("llama", "causal", tmp_path / "other", seed=1))
        )).add_adapter("a", tmp_path)


def test_a_compact_bf16_adapter_recomputes_the_bases_it_trained_on(tiny_case_factory, tmp_path):
    llama = tiny_case_factory("llama", "causal")
    trained = inject_svfit(load_bf16(llama), SVFitConfig(store_bases=False))
    perturb(trained)
    save_svfit_adapter(trained, tmp_path)
    loaded = load_svfit_adapter(llama.load(), tmp_path)  # fp32: the SVD is of its weights rounded to bf16
    for name, layer in loaded.svfit_layers().items():
        original = trained.svfit_layers()[name]
        assert torch.equal(layer.s, original.s) and torch.equal(layer.U.to(torch.bfloat16), original.U), name


def test_pause_and_resume_on_a_bf16_base_is_exact(tiny_case_factory, tmp_path):
    llama = tiny_case_factory("llama", "causal").path
    config = TrainConfig(n_epochs=2, batch_size=4, seed=0, learning_rate=5e-2, base_dtype="bfloat16")
    full, full_rec = train(llama, CHAT, None, PeftSpec(), config, tmp_path / "full")
    paused, first = train(llama, CHAT, None, PeftSpec(), config, tmp_path / "split", stop_after=4)
    resumed, second = train(llama, CHAT, None, PeftSpec(), config, tmp_path / "split",
                            resume_from=paused.last_checkpoint)
    assert first.losses + second.losses == full_rec.losses
    ours, theirs = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (resumed, full))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
