"""The basis store: each base weight's SVD is computed once and reused; adapters and checkpoints name their
bases instead of carrying U and V; setup reports progress and stops between matrices."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import svfit_core.bases as bases_module
from svfit_core import SVFitConfig, inject_svfit, load_svfit_adapter, save_svfit_adapter
from svfit_core.bases import DirectoryBasisStore
from svfit_core.training import PeftSpec, TrainConfig, run_training
from tests.svfit_core.test_training import CHAT, Recorder


@pytest.fixture
def counted_svds(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of every SVD the basis code runs."""
    calls: list[tuple[int, ...]] = []
    real = bases_module.truncated_svd

    def counting(weight, config):
        calls.append(tuple(weight.shape))
        return real(weight, config)

    monkeypatch.setattr(bases_module, "truncated_svd", counting)
    return calls


@pytest.fixture(scope="module")
def llama(tiny_case_factory):
    return tiny_case_factory("llama", "causal")


def _trained(case, store, config=None):
    model = inject_svfit(case.load(), config or SVFitConfig(target_modules="all-linear"), bases=store)
    with torch.no_grad():
        for layer in model.svfit_layers().values():
            layer.sigma.add_(0.05 * torch.randn_like(layer.sigma))
    return model


def test_each_weight_is_decomposed_once_per_rule(llama, tmp_path, counted_svds):
    store = DirectoryBasisStore(tmp_path / "bases")
    first = inject_svfit(llama.load(), SVFitConfig(target_modules="all-linear"), bases=store)
    n = len(first.svfit_layers())
    assert len(counted_svds) == n and len(list((tmp_path / "bases").glob("*.safetensors"))) == n

    second = inject_svfit(llama.load(), SVFitConfig(target_modules="all-linear"), bases=store)
    assert len(counted_svds) == n, "the second model took every basis from the store"
    for name, layer in second.svfit_layers().items():
        assert torch.equal(layer.U, first.svfit_layers()[name].U) and torch.equal(layer.s, first.svfit_layers()[name].s)

    inject_svfit(llama.load(), SVFitConfig(target_modules="all-linear", rank=2), bases=store)
    assert len(counted_svds) == 2 * n, "another rank rule is another basis"


def test_a_store_in_another_folder_copy_is_reused(llama, tmp_path, counted_svds):
    inject_svfit(llama.load(), SVFitConfig(), bases=DirectoryBasisStore(tmp_path / "a"))
    computed = len(counted_svds)
    (tmp_path / "a").rename(tmp_path / "b")  # what another worker sees through a shared object store
    inject_svfit(llama.load(), SVFitConfig(), bases=DirectoryBasisStore(tmp_path / "b"))
    assert len(counted_svds) == computed


def test_adapter_names_its_bases_and_loads_from_the_store_or_by_svd(llama, tmp_path):
    store = DirectoryBasisStore(tmp_path / "bases")
    model = _trained(llama, store)
    save_svfit_adapter(model, tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tensors and all(key.endswith(".sigma") for key in tensors), "no U, V or s in the adapter"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["store_bases"] is False
    assert {spec["basis"] for spec in config["modules"].values()} == set(model.basis_keys.values())

    batch = llama.batch()
    with torch.no_grad():
        expected = model(**batch).logits
        from_store = load_svfit_adapter(llama.load(), tmp_path / "adapter", bases=store)(**batch).logits
        by_svd = load_svfit_adapter(llama.load(), tmp_path / "adapter")(**batch).logits
    assert torch.equal(from_store, expected)
    assert (by_svd - expected).abs().max() < 1e-4  # the SVD recomputed: same triplets up to rounding


def test_a_compact_adapter_is_a_small_fraction_of_a_full_one(llama, tmp_path):
    compact = _trained(llama, DirectoryBasisStore(tmp_path / "bases"))
    full = _trained(llama, None)
    save_svfit_adapter(compact, tmp_path / "compact")
    save_svfit_adapter(full, tmp_path / "full")
    sigma_bytes = sum(4 * layer.rank for layer in compact.svfit_layers().values())
    compact_bytes = (tmp_path / "compact" / "adapter_model.safetensors").stat().st_size
    assert compact_bytes <= 2 * sigma_bytes + 4096  # σ plus the safetensors header
    assert compact_bytes * 10 < (tmp_path / "full" / "adapter_model.safetensors").stat().st_size


TRAIN = TrainConfig(n_epochs=2, batch_size=4, checkpoint_every=2, seed=0, learning_rate=5e-2)


def test_training_with_a_store_writes_checkpoints_without_bases_and_resumes_exactly(llama, tmp_path):
    store = DirectoryBasisStore(tmp_path / "bases")
    spec = PeftSpec(target_modules="all-linear")
    full = Recorder()
    done = run_training(llama.path, CHAT, None, spec, TRAIN, tmp_path / "full", full, bases=store)
    for step, path in full.checkpoints:
        tensors = load_file(path / "adapter_model.safetensors")
        assert all(key.endswith(".sigma") for key in tensors), step
        # σ and its two Adam moments: the checkpoint is the size of the update, not of the model.
        sigma_bytes = sum(t.numel() * 4 for t in tensors.values())
        state_bytes = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
        assert state_bytes <= 2 * 3 * sigma_bytes + 2**20, step

    first = Recorder(stop_after=3)
    paused = run_training(llama.path, CHAT, None, spec, TRAIN, tmp_path / "resumed", first, bases=store)
    second = Recorder()
    resumed = run_training(llama.path, CHAT, None, spec, TRAIN, tmp_path / "resumed", second,
                           resume_from=paused.last_checkpoint, bases=store)
    assert first.losses + second.losses == full.losses
    final_a = load_file(done.adapter_dir / "adapter_model.safetensors")
    final_b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_setup_reports_progress_and_stops_between_matrices(llama, tmp_path, counted_svds):
    recorder = Recorder(decision="cancel")
    recorder.stop_after_matrices = 1
    result = run_training(llama.path, CHAT, None, PeftSpec(target_modules="all-linear"), TRAIN, tmp_path,
                          recorder, bases=DirectoryBasisStore(tmp_path / "bases"))
    assert result.ended_by == "cancel" and result.step == 0 and result.adapter_dir is None
    total = recorder.setup_progress[0][1]
    assert total > 2 and recorder.setup_progress == [(1, total)]
    assert len(counted_svds) == 1, "no matrix after the stop was decomposed"
    assert not recorder.info, "training never started"


def test_setup_progress_counts_every_matrix(llama, tmp_path):
    recorder = Recorder()
    run_training(llama.path, CHAT, None, PeftSpec(), TRAIN, tmp_path, recorder)
    total = recorder.setup_progress[-1][1]
    assert recorder.setup_progress == [(i, total) for i in range(1, total + 1)]


def test_serving_reads_a_compact_adapters_bases_from_the_store(llama, tmp_path, counted_svds):
    from svfit_core.multi_adapter import MultiAdapterModel

    store = DirectoryBasisStore(tmp_path / "bases")
    model = _trained(llama, store)
    save_svfit_adapter(model, tmp_path / "adapter")
    computed = len(counted_svds)
    batch = llama.batch()
    with torch.no_grad():
        expected = model(**batch).logits
        served = MultiAdapterModel(llama.load(), bases=store)
        served.add_adapter("a", tmp_path / "adapter")
        served.set_batch(["a"] * batch["input_ids"].shape[0])
        logits = served.model(**batch).logits
    assert len(counted_svds) == computed, "no SVD at serving time"
    assert (logits - expected).abs().max() < 1e-5
