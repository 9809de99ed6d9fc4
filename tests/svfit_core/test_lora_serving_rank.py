"""LoRA exports at a serving rank r′: exactly the best rank-r′ approximation of each update (checked against a
dense SVD), factors in the base weights' dtype, and the kept share of the update's energy."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from svfit_core import SVFitConfig, export_peft_lora, inject_svfit
from svfit_core.export import PEFT_PREFIX, read_kept_energy, truncate_peft_lora

RANK = 3


def perturbed(model, seed: int = 0):
    """All-linear SVFit at r = k with every σ moved by seeded noise of varied size, so the |Δσ| ranking is
    not the σ ranking (the truncation must sort by |Δσ|, not keep the top singular directions)."""
    svfit_model = inject_svfit(model, SVFitConfig(rank=None, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in svfit_model.svfit_layers().values():
            layer.sigma.add_(torch.randn(layer.rank, generator=g) * torch.rand(layer.rank, generator=g))
    return svfit_model


def factors(folder, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"], tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"]


def best_rank(delta_w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(best rank-``rank`` approximation, its Frobenius error) of a dense matrix, by brute force in float64."""
    u, s, vh = torch.linalg.svd(delta_w.to(torch.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], s[rank:].square().sum().sqrt()


def test_svfit_export_at_a_rank_is_the_best_approximation_of_each_update(tiny_case_factory, tmp_path):
    svfit_model = perturbed(tiny_case_factory("llama", "causal").load())
    export_peft_lora(svfit_model, tmp_path, rank=RANK)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == RANK and not config["rank_pattern"]
    for name, layer in svfit_model.svfit_layers().items():
        delta_w = layer.get_delta_weight().to(torch.float64)  # (out, in): Linear layers
        b, a = factors(tmp_path, name)
        exported = b.to(torch.float64) @ a.to(torch.float64)
        best, error = best_rank(delta_w, RANK)
        torch.testing.assert_close(exported, best, atol=1e-5, rtol=0)
        # Eckart–Young: what is lost is exactly the dropped Δσ
        delta = layer.delta_sigma().detach().to(torch.float64)
        dropped = delta.abs().sort().values[:-RANK]
        assert torch.isclose((delta_w - exported).norm(), dropped.square().sum().sqrt(), rtol=1e-5)
        assert torch.isclose((delta_w - exported).norm(), error, rtol=1e-5)
        # the top |Δσ| are not the top σ here: keeping the first r′ columns would fail the checks above
        assert set(torch.topk(delta.abs(), RANK).indices.tolist()) != set(range(RANK))


def test_a_rank_at_or_above_a_modules_rank_exports_it_whole(tiny_case_factory, tmp_path):
    svfit_model = perturbed(tiny_case_factory("llama", "causal").load())
    export_peft_lora(svfit_model, tmp_path, rank=512)
    for name, layer in svfit_model.svfit_layers().items():
        b, a = factors(tmp_path, name)
        assert a.shape[0] == layer.rank
        torch.testing.assert_close(b @ a, layer.get_delta_weight(), atol=1e-6, rtol=0)
    assert read_kept_energy(tmp_path)["kept_energy"] == 1.0


def test_kept_energy_is_the_kept_share_of_delta_sigma_squared(tiny_case_factory, tmp_path):
    svfit_model = perturbed(tiny_case_factory("llama", "causal").load())
    export_peft_lora(svfit_model, tmp_path / "cut", rank=RANK)
    record = read_kept_energy(tmp_path / "cut")
    assert record["rank"] == RANK
    kept = total = 0.0
    for name, layer in svfit_model.svfit_layers().items():
        squares = layer.delta_sigma().detach().to(torch.float64).square()
        top = squares.sort(descending=True).values[:RANK].sum()
        assert record["layers"][name] == pytest.approx(float(top / squares.sum()), rel=1e-5)
        kept, total = kept + float(top), total + float(squares.sum())
    assert record["kept_energy"] == pytest.approx(kept / total, rel=1e-5)
    assert 0 < record["kept_energy"] < 1

    untrained = inject_svfit(tiny_case_factory("llama", "causal").load(), SVFitConfig(rank=None))
    export_peft_lora(untrained, tmp_path / "zero", rank=RANK)
    zero = read_kept_energy(tmp_path / "zero")
    assert zero["kept_energy"] == 1.0 and set(zero["layers"].values()) == {1.0}  # Δσ = 0: nothing lost


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_factors_come_in_the_base_weights_dtype(tiny_case_factory, dtype, tmp_path):
    base = tiny_case_factory("llama", "causal").load().to(dtype)
    svfit_model = perturbed(base)
    export_peft_lora(svfit_model, tmp_path, rank=RANK)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {dtype}
    name, layer = next(iter(svfit_model.svfit_layers().items()))
    b, a = factors(tmp_path, name)
    best, _ = best_rank(layer.get_delta_weight(), RANK)
    tolerance = 2e-2 * best.abs().max().item() if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(b.double() @ a.double(), best, atol=tolerance, rtol=0)


def peft_lora(model, out, *, rank: int, alpha: int, rslora: bool = False):
    """A saved PEFT LoRA with seeded random A and B (B = 0 at init would make every update zero)."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora,
                                            target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    peft.save_pretrained(out)
    return peft


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lora_truncation_matches_a_dense_svd_of_its_update(tiny_case_factory, rslora, tmp_path):
    from peft import PeftModel

    case = tiny_case_factory("llama", "causal")
    peft_lora(case.load(), tmp_path / "lora", rank=8, alpha=16, rslora=rslora)
    scale = 16 / (8 ** 0.5 if rslora else 8)
    original = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    truncate_peft_lora(tmp_path / "lora", tmp_path / "cut", RANK)

    record = read_kept_energy(tmp_path / "cut")
    config = json.loads((tmp_path / "cut" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == RANK and not config["use_rslora"]
    kept = total = 0.0
    for key in [k for k in original if k.endswith(".lora_A.weight")]:
        name = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        delta_w = scale * original[key.replace("lora_A", "lora_B")].double() @ original[key].double()
        b, a = factors(tmp_path / "cut", name)
        best, error = best_rank(delta_w, RANK)
        torch.testing.assert_close(b.double() @ a.double(), best, atol=1e-4, rtol=1e-5)
        assert torch.isclose((delta_w - b.double() @ a.double()).norm(), error, rtol=1e-4)
        s = torch.linalg.svdvals(delta_w).square()
        assert record["layers"][name] == pytest.approx(float(s[:RANK].sum() / s.sum()), rel=1e-6)
        kept, total = kept + float(s[:RANK].sum()), total + float(s.sum())
    assert record["kept_energy"] == pytest.approx(kept / total, rel=1e-6) and record["kept_energy"] < 1
    loaded = PeftModel.from_pretrained(case.load(), tmp_path / "cut")  # a LoRA PEFT itself loads
    assert loaded.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").lora_A["default"].out_features == RANK


def test_lora_at_or_above_its_rank_is_copied_unchanged(tiny_case_factory, tmp_path):
    peft_lora(tiny_case_factory("llama", "causal").load(), tmp_path / "lora", rank=8, alpha=16)
    truncate_peft_lora(tmp_path / "lora", tmp_path / "same", 8)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "same" / name).read_bytes() == (tmp_path / "lora" / name).read_bytes()
    assert read_kept_energy(tmp_path / "same")["kept_energy"] == 1.0
