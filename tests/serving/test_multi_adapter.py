"""The batched multi-adapter SVFit forward (svfit_core.multi_adapter) against each adapter loaded alone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from svfit_core import load_svfit_adapter
from svfit_core.errors import BaseModelMismatchError, ConfigError
from svfit_core.multi_adapter import MultiAdapterLinear, MultiAdapterModel
from testkit.tiny_models import build_tiny, load_tiny, sample_batch
from tests.serving.conftest import perturbed_svfit

ATOL = 1e-4  # fp32


def alone_logits(zoo, name, batch: dict) -> torch.Tensor:
    """The logits of one adapter (a zoo name or a folder; None: the base) loaded on its own."""
    model = load_tiny(zoo.llama, "causal")
    if name is not None:
        model = load_svfit_adapter(model, zoo.adapters[name] if isinstance(name, str) else name)
    return model(**batch).logits


@pytest.fixture
def multi(zoo):
    base = load_tiny(zoo.llama, "causal")
    multi = MultiAdapterModel(base)
    for name in ("sv0", "sv1", "sv2", "sv_qv"):
        multi.add_adapter(name, zoo.adapters[name])
    return multi


@torch.no_grad()
def test_mixed_batch_equals_each_adapter_alone(zoo, multi):
    rows = ["sv0", None, "sv1", "sv2", "sv_qv", "sv0"]
    batch = sample_batch(len(rows), 10, seed=3)
    multi.set_batch(rows)
    mixed = multi.model(**batch).logits
    for i, name in enumerate(rows):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        torch.testing.assert_close(mixed[i:i + 1], alone_logits(zoo, name, one), atol=ATOL, rtol=0)
    # the rows really differ: the test would pass trivially if adapters did nothing
    assert (mixed[0] - mixed[1]).abs().max() > 1e-2


@torch.no_grad()
def test_bases_are_shared_grown_and_separated(zoo, multi, tmp_path):
    q = multi._slots["model.layers.0.self_attn.q_proj"]
    k = multi._slots["model.layers.0.self_attn.k_proj"]
    # One SVD per weight: sv0, sv1 (r=8), sv2 (r=16) and sv_qv (r=k=32 on q, v) all live in one basis, grown
    # to the largest rank; lower ranks are zero-padded into it.
    assert [b.rank for b in q.bases] == [32]
    assert [b.rank for b in k.bases] == [16]
    assert isinstance(q, MultiAdapterLinear)
    # An adapter whose stored vectors are not that SVD's gets a basis of its own, in the same forward.
    other = tmp_path / "other"
    shutil.copytree(zoo.adapters["sv0"], other)
    tensors = load_file(str(other / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(7)
    for key in [k for k in tensors if "self_attn.q_proj" in k and k[-2:] in (".U", ".V")]:
        tensors[key] = torch.linalg.qr(torch.randn(tensors[key].shape, generator=g))[0].contiguous()
    save_file(tensors, str(other / "adapter_model.safetensors"))
    multi.add_adapter("other", other)
    assert sorted(b.rank for b in q.bases) == [8, 32]
    rows = ["other", "sv2", None]
    batch = sample_batch(3, 7, seed=5)
    multi.set_batch(rows)
    mixed = multi.model(**batch).logits
    for i, name in enumerate(rows):
        one = {key: v[i:i + 1] for key, v in batch.items()}
        torch.testing.assert_close(mixed[i:i + 1], alone_logits(zoo, other if name == "other" else name, one),
                                   atol=ATOL, rtol=0)


@torch.no_grad()
def test_base_rows_only_is_the_base_model(zoo, multi):
    batch = sample_batch(2, 6)
    multi.set_batch([None, None])
    assert torch.equal(multi.model(**batch).logits, alone_logits(zoo, None, batch))


@torch.no_grad()
def test_serving_rank_keeps_largest_delta_sigma(zoo, multi, tmp_path):
    batch = sample_batch(1, 8)
    multi.set_batch(["sv2"], serving_rank=16)  # r' = r: exact
    torch.testing.assert_close(multi.model(**batch).logits, alone_logits(zoo, "sv2", batch), atol=ATOL, rtol=0)
    # r' = 4: the same as an adapter whose Δσ outside its 4 largest |Δσ| is zeroed
    multi.set_batch(["sv2"], serving_rank=4)
    truncated = multi.model(**batch).logits
    ref = load_svfit_adapter(load_tiny(zoo.llama, "causal"), zoo.adapters["sv2"])
    for layer in ref.svfit_layers().values():
        delta = layer.sigma - layer.s
        drop = torch.ones_like(delta, dtype=torch.bool)
        drop[torch.topk(delta.abs(), 4).indices] = False
        layer.sigma[drop] = layer.s[drop]
    torch.testing.assert_close(truncated, ref(**batch).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_sign_flipped_basis_is_shared(zoo, multi, tmp_path):
    """An SVD recomputed elsewhere may flip a pair (u_i, v_i); the update is the same, so is the basis."""
    flipped = tmp_path / "flipped"
    shutil.copytree(zoo.adapters["sv1"], flipped)
    tensors = load_file(str(flipped / "adapter_model.safetensors"))
    for key in [k for k in tensors if k.endswith(".U") or k.endswith(".V")]:
        tensors[key] = tensors[key].clone()
        tensors[key][:, 0] *= -1
    save_file(tensors, str(flipped / "adapter_model.safetensors"))
    multi.add_adapter("flipped", flipped)
    q = multi._slots["model.layers.0.self_attn.q_proj"]
    assert [b.rank for b in q.bases] == [32]
    batch = sample_batch(2, 6)
    multi.set_batch(["sv1", "flipped"])
    out = multi.model(**batch).logits
    multi.set_batch(["sv1", "sv1"])
    torch.testing.assert_close(out, multi.model(**batch).logits, atol=ATOL, rtol=0)


def test_adapter_of_other_weights_is_refused_and_registry_unchanged(zoo, multi, tmp_path):
    wrong = tmp_path / "wrong"
    shutil.copytree(zoo.adapters["sv0"], wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    config["modules"]["model.layers.1.mlp.up_proj"]["base_sha256"] = "0" * 64
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelMismatchError) as info:
        multi.add_adapter("wrong", wrong)
    assert info.value.code == "weight_hash_mismatch"
    assert "wrong" not in multi.adapters


def test_adapter_with_a_trained_head_is_not_shareable(zoo, tmp_path):
    multi = MultiAdapterModel(load_tiny(zoo.bert, "classification"))
    with pytest.raises(ConfigError) as info:
        multi.add_adapter("clf", zoo.adapters["clf"])
    assert info.value.code == "not_shareable"


@torch.no_grad()
def test_remove_adapter_frees_its_basis(zoo, tmp_path):
    multi = MultiAdapterModel(load_tiny(zoo.llama, "causal"))
    multi.add_adapter("qv", zoo.adapters["sv_qv"])
    multi.add_adapter("a", zoo.adapters["sv0"])
    q = multi._slots["model.layers.0.self_attn.q_proj"]
    multi.remove_adapter("qv")
    assert [b.rank for b in q.bases if b is not None] == [32]  # sv0 keeps the grown basis it lives in
    with pytest.raises(KeyError):
        multi.set_batch(["qv"])
    batch = sample_batch(1, 5)
    multi.set_batch(["a"])
    torch.testing.assert_close(multi.model(**batch).logits, alone_logits(zoo, "sv0", batch), atol=ATOL, rtol=0)


@torch.no_grad()
def test_compact_adapter_recomputes_the_same_basis(zoo, tmp_path):
    """An artifact without U, V (store_bases=False) recomputes the SVD of the verified base."""
    compact = tmp_path / "compact"
    shutil.copytree(zoo.adapters["sv0"], compact)
    tensors = load_file(str(compact / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k.endswith(".sigma") or k.endswith(".s")},
              str(compact / "adapter_model.safetensors"))
    config = json.loads((compact / "adapter_config.json").read_text())
    config["store_bases"] = False
    (compact / "adapter_config.json").write_text(json.dumps(config))
    multi = MultiAdapterModel(load_tiny(zoo.llama, "causal"))
    multi.add_adapter("full", zoo.adapters["sv0"])
    multi.add_adapter("compact", compact)
    batch = {k: v.repeat(2, 1) for k, v in sample_batch(1, 6).items()}  # the same input on both rows
    multi.set_batch(["full", "compact"])
    out = multi.model(**batch).logits
    torch.testing.assert_close(out[0], out[1], atol=ATOL, rtol=0)



@torch.no_grad()
def test_gpt2_conv1d_layers(tmp_path):
    """GPT-2 stores weights (in, out) in Conv1D layers; the shared bases are in (out, in) layout all the same."""
    base_dir = build_tiny("gpt2", "causal", tmp_path)
    folders = [perturbed_svfit(base_dir, tmp_path / f"g{i}", i, rank=4) for i in range(2)]
    multi = MultiAdapterModel(load_tiny(base_dir, "causal"))
    for i, folder in enumerate(folders):
        multi.add_adapter(f"g{i}", folder)
    rows = ["g0", "g1", None]
    batch = sample_batch(3, 6, seed=2)
    multi.set_batch(rows)
    mixed = multi.model(**batch).logits
    for i, name in enumerate(rows):
        model = load_tiny(base_dir, "causal")
        if name is not None:
            model = load_svfit_adapter(model, folders[i])
        one = {k: v[i:i + 1] for k, v in batch.items()}
        torch.testing.assert_close(mixed[i:i + 1], model(**one).logits, atol=ATOL, rtol=0)
