"""SVFit's banded variant (``band`` = d > 0: SVFT's banded coupling): W' = W + U_r Δ V_rᵀ with
Δ = diag(σ − s_r) + d trained off-diagonals on each side. Identity at init, the forward against the dense
formula, training, parameter count, save/load, merge, and the LoRA export at full and at a serving rank."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D

from svfit_core import (
    SVFitConfig,
    SVFitLayer,
    export_merged,
    export_peft_lora,
    inject_svfit,
    load_svfit_adapter,
    save_svfit_adapter,
)
from svfit_core.bases import DirectoryBasisStore, basis_key
from svfit_core.errors import AdapterFormatError
from svfit_core.export import lora_factors, read_kept_energy
from svfit_core.layer import band_size, banded_product, coupling_matrix
from svfit_core.training.param_groups import build_param_groups
from svfit_core.training.run_config import HyperparameterError, PeftSpec


def perturb_banded(svfit_model, seed: int = 0, scale: float = 0.2) -> None:
    """Move σ, the off-diagonals and the head away from their init, as training would. The off-diagonals
    move by as much as the diagonal, so a test that dropped them would see it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in svfit_model.svfit_layers().values():
            size = layer.s.abs().mean()
            layer.sigma.add_(scale * torch.randn(layer.sigma.shape, generator=g) * size)
            layer.band_weights.add_(scale * torch.randn(layer.band_weights.shape, generator=g) * size)
        for p in svfit_model.head_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def dense_delta(layer: SVFitLayer) -> torch.Tensor:
    """ΔW = U_r Δ V_rᵀ (out, in) in float64, Δ built entry by entry from the packed layout."""
    r, d = layer.rank, layer.band
    delta = torch.diag(layer.delta_sigma().detach().double())
    packed = layer.band_weights.detach().double().tolist()
    for j in range(1, d + 1):
        upper, lower = packed[: r - j], packed[r - j: 2 * (r - j)]
        packed = packed[2 * (r - j):]
        for i in range(r - j):
            delta[i, i + j] = upper[i]
            delta[i + j, i] = lower[i]
    assert not packed
    return layer.U.double() @ delta @ layer.V.double().mT


# -- the layer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("band", [1, 2])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("layer_cls", [nn.Linear, Conv1D])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
def test_banded_layer_is_the_base_layer_at_init(layer_cls, autocast, dtype, band):
    torch.manual_seed(0)
    base = (nn.Linear(24, 16) if layer_cls is nn.Linear else Conv1D(16, 24)).to(dtype)
    layer = SVFitLayer.from_base(base, SVFitConfig(rank=8, band=band))
    assert layer.band == band and layer.band_weights.dtype == torch.float32
    assert torch.equal(layer.band_weights, torch.zeros(band_size(8, band)))
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = base(x)
        y = layer(x)
    assert y.dtype == expected.dtype and torch.equal(y, expected)
    y.float().sum().backward()
    assert x.grad.dtype == x.dtype
    assert layer.sigma.grad.dtype == layer.band_weights.grad.dtype == torch.float32
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["sigma", "band_weights"]


@pytest.mark.parametrize(
    "r,band,expected",
    [(8, 1, 8 + 2 * 7), (8, 2, 8 + 2 * (7 + 6)), (5, 8, 5 + 2 * (4 + 3 + 2 + 1)), (2, 2, 2 + 2 * 1), (1, 2, 1)],
)
def test_parameter_count_is_r_plus_twice_the_off_diagonal_lengths(r, band, expected):
    base = nn.Linear(12, 10)
    layer = SVFitLayer.from_base(base, SVFitConfig(rank=r, band=band))
    assert layer.band == min(band, r - 1)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == expected
    assert r + band_size(r, band) == expected


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("band", [1, 2])
def test_forward_equals_the_dense_formula(transposed, band):
    torch.manual_seed(1)
    base = Conv1D(10, 12) if transposed else nn.Linear(12, 10)
    layer = SVFitLayer.from_base(base, SVFitConfig(rank=6, band=band))
    with torch.no_grad():
        layer.sigma.add_(torch.randn(6))
        layer.band_weights.copy_(torch.randn(layer.band_weights.shape))
    x = torch.randn(2, 7, 12)
    w = base.weight.mT if transposed else base.weight  # (out, in)
    expected = x.double() @ (w.double() + dense_delta(layer)).mT + base.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=0)
    # Δ really is banded: nothing beyond the d-th off-diagonal, and every trained entry on its diagonal
    coupling = layer.coupling().detach()
    i, k = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.all(coupling[(i - k).abs() > band] == 0)
    assert int((coupling[((i - k).abs() <= band) & (i != k)] != 0).sum()) == band_size(6, band)


def test_banded_product_is_z_times_the_coupling_transposed():
    g = torch.Generator().manual_seed(2)
    r, band = 7, 3
    f64 = dict(generator=g, dtype=torch.float64, requires_grad=True)
    delta, packed, z = torch.randn(r, **f64), torch.randn(band_size(r, band), **f64), torch.randn(4, 5, r, **f64)
    coupling = coupling_matrix(delta, packed, band)
    assert coupling[0, 1] == packed[0] and coupling[1, 0] == packed[r - 1]  # upper_1 first, then lower_1
    torch.testing.assert_close(banded_product(z, delta, packed, band), z @ coupling.mT)
    assert torch.autograd.gradcheck(lambda z, d, p: banded_product(z, d, p, band), (z, delta, packed))


# -- training ------------------------------------------------------------------------------------------


def test_training_moves_the_off_diagonals_and_the_loss_falls(tiny_case_factory):
    case = tiny_case_factory("llama", "causal")
    svfit_model = inject_svfit(case.load(), SVFitConfig(rank=8, band=2))
    groups = build_param_groups(svfit_model, [], body_name="svfit", lr=5e-2, head_lr=5e-3, weight_decay=0.1,
                                decay_body=False)
    # σ and the off-diagonals: one group, the σ learning rate, no weight decay (a 2-D band would be decayed)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and groups[0]["lr"] == 5e-2
    names = groups[0]["param_names"]
    assert {n.rsplit(".", 1)[-1] for n in names} == {"sigma", "band_weights"}
    assert len(names) == 2 * len(svfit_model.svfit_layers())
    assert svfit_model.svfit_parameters() == groups[0]["params"]
    optimizer = torch.optim.AdamW(groups)
    batch = case.batch()
    losses = []
    svfit_model.train()
    for _ in range(8):
        loss = svfit_model(**batch, labels=case.labels(batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for layer in svfit_model.svfit_layers().values():
        assert layer.band_weights.abs().max() > 1e-3


# -- model-level properties ------------------------------------------------------------------------------


def test_identity_at_init(case):
    batch = case.batch()
    expected = logits(case.load(), batch)
    svfit_model = inject_svfit(case.load(), SVFitConfig(band=2))
    assert all(layer.band == 2 for layer in svfit_model.svfit_layers().values())
    assert torch.equal(logits(svfit_model, batch), expected)


def test_trainable_count_of_a_model(tiny_case_factory):
    svfit_model = inject_svfit(tiny_case_factory("llama", "causal").load(), SVFitConfig(rank=8, band=2))
    per_matrix = 8 + 2 * (7 + 6)
    assert svfit_model.trainable_parameter_count() == per_matrix * len(svfit_model.svfit_layers())


@pytest.mark.parametrize("store_bases", [True, False], ids=["bases", "compact"])
def test_save_load_round_trip(case, store_bases, tmp_path):
    svfit_model = inject_svfit(case.load(), SVFitConfig(band=2, store_bases=store_bases))
    perturb_banded(svfit_model)
    batch = case.batch()
    expected = logits(svfit_model, batch)
    save_svfit_adapter(svfit_model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["options"]["band"] == 2
    assert {spec["band"] for spec in config["modules"].values()} == {2}
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k for k in tensors if k.endswith(".band")} == {f"svfit.{n}.band" for n in svfit_model.svfit_layers()}

    loaded = load_svfit_adapter(case.load(), tmp_path, is_trainable=True)
    assert loaded.svfit_config.band == 2
    for name, layer in loaded.svfit_layers().items():
        original = svfit_model.svfit_layers()[name]
        assert layer.band == 2 and torch.equal(layer.band_weights, original.band_weights)
        assert torch.equal(layer.sigma, original.sigma)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=1e-5)
    assert loaded.trainable_parameter_count() == svfit_model.trainable_parameter_count()


def test_an_adapter_without_band_entries_loads_as_band_zero(tiny_case_factory, tmp_path):
    case = tiny_case_factory("llama", "causal")
    svfit_model = inject_svfit(case.load(), SVFitConfig(rank=4))
    save_svfit_adapter(svfit_model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not any("band" in spec for spec in config["modules"].values())
    del config["options"]["band"]  # as an adapter from before the banded variant
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = load_svfit_adapter(case.load(), tmp_path)
    assert loaded.svfit_config.band == 0
    assert all(layer.band == 0 and layer.band_weights is None for layer in loaded.svfit_layers().values())


def test_a_banded_adapter_missing_its_off_diagonals_is_refused(tiny_case_factory, tmp_path):
    case = tiny_case_factory("llama", "causal")
    save_svfit_adapter(inject_svfit(case.load(), SVFitConfig(rank=4, band=1)), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.endswith(".band")}, str(weights))
    with pytest.raises(AdapterFormatError, match=r"\.band"):
        load_svfit_adapter(case.load(), tmp_path)


def test_the_basis_is_the_plain_svfit_one(tiny_case_factory, tmp_path):
    """Same SVD, same key: a banded and a plain adapter of one base share the store's entries."""
    assert basis_key("abc", False, SVFitConfig(rank=4, band=2)) == basis_key("abc", False, SVFitConfig(rank=4))
    case = tiny_case_factory("llama", "causal")
    store = DirectoryBasisStore(tmp_path / "bases")
    plain = inject_svfit(case.load(), SVFitConfig(rank=4), bases=store)
    entries = sorted(p.name for p in store.root.iterdir())
    banded = inject_svfit(case.load(), SVFitConfig(rank=4, band=1), bases=store)
    assert banded.basis_keys == plain.basis_keys and sorted(p.name for p in store.root.iterdir()) == entries
    perturb_banded(banded)
    batch = case.batch()
    expected = logits(banded, batch)
    save_svfit_adapter(banded, tmp_path / "adapter")  # compact: names its bases
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(k.endswith((".sigma", ".band")) for k in tensors)
    loaded = load_svfit_adapter(case.load(), tmp_path / "adapter", bases=store)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)


def test_merge_equals_unmerged_and_unmerge_restores_base(case):
    svfit_model = inject_svfit(case.load(), SVFitConfig(band=1))
    base_weights = {n: l.base_layer.weight.detach().clone() for n, l in svfit_model.svfit_layers().items()}
    perturb_banded(svfit_model)
    batch = case.batch()
    unmerged = logits(svfit_model, batch)
    for layer in svfit_model.svfit_layers().values():
        delta_w = layer.get_delta_weight().double()
        torch.testing.assert_close(delta_w.mT if layer.transposed else delta_w, dense_delta(layer),
                                   atol=1e-5, rtol=0)
    svfit_model.merge()
    torch.testing.assert_close(logits(svfit_model, batch), unmerged, atol=1e-5, rtol=1e-5)
    svfit_model.unmerge()
    for name, layer in svfit_model.svfit_layers().items():
        torch.testing.assert_close(layer.base_layer.weight, base_weights[name], atol=1e-6, rtol=0)


def test_merged_export_uses_the_full_coupling(case, tmp_path):
    svfit_model = inject_svfit(case.load(), SVFitConfig(band=2))
    perturb_banded(svfit_model)
    batch = case.batch()
    expected = logits(svfit_model, batch)
    export_merged(svfit_model, AutoTokenizer.from_pretrained(case.path), tmp_path)
    reloaded = type(case.load()).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-5, rtol=1e-5)


# -- the LoRA export ---------------------------------------------------------------------------------------


def test_peft_lora_export_reproduces_logits(case, tmp_path):
    from peft import PeftModel

    svfit_model = inject_svfit(case.load(), SVFitConfig(band=2))
    perturb_banded(svfit_model)
    batch = case.batch()
    expected = logits(svfit_model, batch)
    export_peft_lora(svfit_model, tmp_path)
    assert read_kept_energy(tmp_path)["kept_energy"] == pytest.approx(1.0)
    peft_model = PeftModel.from_pretrained(case.load(), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, batch), expected, atol=1e-5, rtol=0)
    # the off-diagonals are in it: the σ-only part of the same model is far from it
    with torch.no_grad():
        for layer in svfit_model.svfit_layers().values():
            layer.band_weights.zero_()
    assert (logits(svfit_model, batch) - expected).abs().max() > 1e-3


def test_serving_rank_export_is_the_best_rank_approximation(tiny_case_factory, tmp_path):
    case = tiny_case_factory("llama", "causal")
    svfit_model = inject_svfit(case.load(), SVFitConfig(rank=12, band=2))
    perturb_banded(svfit_model, scale=0.5)
    served = 5
    export_peft_lora(svfit_model, tmp_path, rank=served)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    record = read_kept_energy(tmp_path)
    kept_total = total = 0.0
    for name, layer in svfit_model.svfit_layers().items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"].double()  # (r', in)
        b = tensors[f"base_model.model.{name}.lora_B.weight"].double()  # (out, r')
        assert a.shape[0] == b.shape[1] == served
        delta_w = dense_delta(layer)  # (out, in)
        u, s, vh = torch.linalg.svd(delta_w, full_matrices=False)
        best = (u[:, :served] * s[:served]) @ vh[:served]
        torch.testing.assert_close(b @ a, best, atol=1e-5, rtol=0)
        assert (best - delta_w).abs().max() > 1e-3  # it truncated something
        share = float(s[:served].square().sum() / s.square().sum())
        assert record["layers"][name] == pytest.approx(share, abs=1e-6)
        kept_total += float(s[:served].square().sum())
        total += float(s.square().sum())
    assert record["kept_energy"] == pytest.approx(kept_total / total, abs=1e-6)


def test_band_zero_export_factors_are_the_plain_ones():
    """Band 0 does not go through the coupling SVD: B = U_r diag(Δσ), A = V_rᵀ exactly as before."""
    torch.manual_seed(3)
    layer = SVFitLayer.from_base(nn.Linear(12, 10), SVFitConfig(rank=6))
    with torch.no_grad():
        layer.sigma.add_(torch.randn(6))
    a, b = lora_factors(layer)
    assert torch.equal(a, layer.V.mT) and torch.equal(b, layer.U * (layer.sigma - layer.s).detach())


# -- the option ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [PeftSpec(method="lora", band=1), PeftSpec(method="full", band=2), PeftSpec(band=9), PeftSpec(band=-1),
     PeftSpec(band=True), PeftSpec(band=1.0)],
    ids=["lora", "full", "too-wide", "negative", "bool", "float"],
)
def test_a_bad_band_is_a_hyperparameter_error_naming_band(spec):
    with pytest.raises(HyperparameterError) as info:
        spec.validate()
    assert info.value.param == "band"


def test_band_reaches_the_svfit_config():
    from svfit_core.training.methods import SVFitMethod

    PeftSpec(band=2).validate()
    PeftSpec(method="lora", band=0).validate()
    assert SVFitMethod().svfit_config(PeftSpec(band=2), []).band == 2
