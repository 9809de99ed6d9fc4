"""Property checks of the SVFit core, run over one table of tiny models (GPT-2, Llama, BERT).

Layer-level checks (gradients of every formulation, rank selection on a known spectrum) come first, then
the model-level properties each architecture must satisfy.
"""

from __future__ import annotations

import json

import pytest
import torch
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
from svfit_core.errors import ConfigError
from svfit_core.layer import choose_plan, svfit_linear
from svfit_core.rank import select_rank
from svfit_core.targets import block_prefixes, resolve_targets

FORMULATIONS = ("skinny", "dense", "dense_skinny")


def perturb(svfit_model, seed: int = 0, scale: float = 0.2) -> None:
    """Move every σ away from s_r and the head away from its init, as training would, without paying
    for training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in svfit_model.svfit_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g) * p.abs().mean())
        for p in svfit_model.head_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# -- the layer ---------------------------------------------------------------------------------------


def _naive(x, delta, weight, bias, u, v, transposed):
    w = weight.mT if transposed else weight  # (out, in)
    w_new = w + u @ torch.diag(delta) @ v.mT
    return x @ w_new.mT + bias


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_gradients_match_naive_formula(formulation, transposed):
    g = torch.Generator().manual_seed(0)
    m, n, r = 5, 4, 3
    opts = dict(dtype=torch.float64)
    w = torch.randn(m, n, generator=g, **opts)
    weight = w.mT.contiguous() if transposed else w
    bias = torch.randn(m, generator=g, **opts)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, **opts))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, **opts))
    x = torch.randn(2, 3, n, generator=g, **opts, requires_grad=True)
    delta = torch.randn(r, generator=g, **opts, requires_grad=True)

    def fn(x, delta):
        return svfit_linear(x, delta, weight, bias, u, v, transposed=transposed, formulation=formulation)

    assert torch.autograd.gradcheck(fn, (x, delta))
    out = fn(x, delta)
    ref = _naive(x, delta, weight, bias, u, v, transposed)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(out)
    gx, gd = torch.autograd.grad(out, (x, delta), go)
    rx, rd = torch.autograd.grad(ref, (x, delta), go)
    torch.testing.assert_close((gx, gd), (rx, rd))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("layer_cls", [nn.Linear, Conv1D])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
def test_every_formulation_is_the_base_layer_at_init(layer_cls, autocast, dtype):
    torch.manual_seed(0)
    base = (nn.Linear(24, 16) if layer_cls is nn.Linear else Conv1D(16, 24)).to(dtype)
    layer = SVFitLayer.from_base(base, SVFitConfig(rank=8))
    assert layer.U.dtype == layer.V.dtype == dtype  # the bases in the base's dtype: (16, 8), (24, 8)
    assert layer.s.dtype == layer.sigma.dtype == torch.float32  # (8,)
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = base(x)
        for formulation in FORMULATIONS:
            layer.formulation = formulation
            y = layer(x)
            assert y.dtype == expected.dtype and torch.equal(y, expected), formulation
    y.float().sum().backward()
    assert x.grad.dtype == x.dtype and layer.sigma.grad.dtype == torch.float32
    assert not any(p.requires_grad for p in base.parameters())
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["sigma"]


def test_cost_rule_picks_skinny_for_decoding_and_dense_for_full_rank_batches():
    d = 768
    assert choose_plan(1, d, d, d, need_x=False, need_sigma=False).forward == "skinny"
    assert choose_plan(4096, d, d, d, need_x=True, need_sigma=True).forward == "dense"
    assert choose_plan(4096, d, d, d, need_x=True, need_sigma=True).grad_sigma == "outer"


# -- rank selection ----------------------------------------------------------------------------------


def _matrix_with_spectrum(s: torch.Tensor, m: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = s.numel()
    return (q1[:, :k] * s.double()) @ q2[:, :k].mT


def test_energy_selects_smallest_rank_holding_tau():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0, 0.0])  # squared energy 16, 4, 1, 1 of 22
    rank = lambda **kw: select_rank(s, SVFitConfig(**kw))  # noqa: E731
    assert rank(energy=16 / 22) == 1
    assert rank(energy=0.75) == 2  # 20/22 ≥ 0.75 > 16/22
    assert rank(energy=0.95) == 3  # 21/22
    assert rank(energy=1.0) == 4  # zeros add no energy
    assert rank(energy=0.5, energy_measure="linear") == 1  # 4 of 8
    assert rank(energy=0.8, energy_measure="linear") == 3  # 7 of 8
    assert rank() == 6 and rank(rank=100) == 6 and rank(rank=2, energy=0.1) == 2
    assert select_rank(torch.zeros(5), SVFitConfig(energy=0.9)) == 1


@pytest.mark.parametrize("train_bottom", [False, True], ids=["top", "bottom"])
def test_layer_trains_the_selected_singular_values(train_bottom):
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    base = nn.Linear(6, 10).double()
    with torch.no_grad():
        base.weight.copy_(_matrix_with_spectrum(s, 10, 6))
    layer = SVFitLayer.from_base(base, SVFitConfig(energy=0.99, train_bottom=train_bottom))
    # 64+16+4 = 84 of 85.3125 < 0.99; adding the 1.0 reaches 85/85.3125 ≥ 0.99
    assert layer.rank == 4
    expected = s[2:] if train_bottom else s[:4]
    torch.testing.assert_close(layer.s, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.sigma.detach(), layer.s)


# -- model-level properties over the table ------------------------------------------------------------


def test_identity_at_init(case):
    batch = case.batch()
    expected = logits(case.load(), batch)
    svfit_model = inject_svfit(case.load(), SVFitConfig())
    assert torch.equal(logits(svfit_model, batch), expected)


def test_only_sigma_and_head_train(case):
    svfit_model = inject_svfit(case.load(), SVFitConfig())
    trainable = {n for n, p in svfit_model.named_parameters() if p.requires_grad}
    sigma_names = {n for n in trainable if n.endswith(".sigma")}
    head_names = trainable - sigma_names
    assert len(sigma_names) == len(svfit_model.svfit_layers())
    # BERT's pooler (dense + tanh between encoder and head) trains in full with its head
    saved = {"bert": ("model.bert.pooler.", "model.classifier.")}.get(case.arch, ("model.score.",))
    assert {prefix for n in head_names for prefix in saved if n.startswith(prefix)} == (
        set(saved) if case.task == "classification" else set()
    )
    assert all(n.startswith(saved) for n in head_names)
    assert svfit_model.trainable_parameter_count() == sum(svfit_model.ranks.values()) + sum(
        p.numel() for p in svfit_model.head_parameters()
    )

    before = {k: v.clone() for k, v in svfit_model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in svfit_model.parameters() if p.requires_grad], lr=1e-2)
    svfit_model.train()
    for step in range(3):
        batch = case.batch(seed=step)
        svfit_model(**batch, labels=case.labels(batch)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = svfit_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable


def test_merge_equals_unmerged_and_unmerge_restores_base(case):
    svfit_model = inject_svfit(case.load(), SVFitConfig())
    base_weights = {n: l.base_layer.weight.detach().clone() for n, l in svfit_model.svfit_layers().items()}
    perturb(svfit_model)
    batch = case.batch()
    unmerged = logits(svfit_model, batch)

    svfit_model.merge()
    torch.testing.assert_close(logits(svfit_model, batch), unmerged, atol=1e-5, rtol=1e-5)
    svfit_model.unmerge()
    for name, layer in svfit_model.svfit_layers().items():
        torch.testing.assert_close(layer.base_layer.weight, base_weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(svfit_model, batch), unmerged, atol=1e-5, rtol=1e-5)

    plain = svfit_model.merge_and_unload()
    assert not any(isinstance(m, SVFitLayer) for m in plain.modules())
    original_classes = {type(m) for n, m in case.load().named_modules() if n in base_weights}
    assert {type(plain.get_submodule(n)) for n in base_weights} == original_classes
    torch.testing.assert_close(logits(plain, batch), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("store_bases", [True, False], ids=["bases", "compact"])
def test_save_load_round_trip(case, store_bases, tmp_path):
    svfit_model = inject_svfit(case.load(), SVFitConfig(store_bases=store_bases))
    perturb(svfit_model)
    batch = case.batch()
    expected = logits(svfit_model, batch)
    save_svfit_adapter(svfit_model, tmp_path)

    loaded = load_svfit_adapter(case.load(), tmp_path)
    assert loaded.ranks == svfit_model.ranks
    assert loaded.modules_to_save == svfit_model.modules_to_save
    for name, layer in loaded.svfit_layers().items():
        original = svfit_model.svfit_layers()[name]
        assert torch.equal(layer.sigma, original.sigma)
        if store_bases:
            assert torch.equal(layer.U, original.U) and torch.equal(layer.V, original.V)
    for p, q in zip(loaded.head_parameters(), svfit_model.head_parameters()):
        assert torch.equal(p, q)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=1e-5)
    assert loaded.trainable_parameter_count() == 0  # inference load by default


def test_peft_lora_export_reproduces_logits(case, tmp_path):
    from peft import PeftModel

    svfit_model = inject_svfit(case.load(), SVFitConfig())
    perturb(svfit_model)
    batch = case.batch()
    expected = logits(svfit_model, batch)
    export_peft_lora(svfit_model, tmp_path)
    peft_model = PeftModel.from_pretrained(case.load(), tmp_path)
    assert (logits(peft_model, batch) - expected).abs().max() <= 1e-4


def test_peft_lora_export_with_mixed_and_padded_ranks(tiny_case_factory, tmp_path):
    from peft import PeftModel

    case = tiny_case_factory("llama", "causal")
    svfit_model = inject_svfit(case.load(), SVFitConfig(energy=0.6))
    assert len(set(svfit_model.ranks.values())) > 1
    perturb(svfit_model)
    batch = case.batch()
    expected = logits(svfit_model, batch)
    export_peft_lora(svfit_model, tmp_path, allowed_ranks=[4, 8, 16, 32])
    peft_model = PeftModel.from_pretrained(case.load(), tmp_path)
    allowed = {4, 8, 16, 32}
    for name, r in svfit_model.ranks.items():
        lora_a = peft_model.get_submodule(f"base_model.model.{name}").lora_A["default"]
        assert lora_a.out_features in allowed and lora_a.out_features >= r
    assert (logits(peft_model, batch) - expected).abs().max() <= 1e-4


def test_merged_export_reloads_with_identical_outputs(case, tmp_path):
    svfit_model = inject_svfit(case.load(), SVFitConfig())
    perturb(svfit_model)
    batch = case.batch()
    expected = logits(svfit_model, batch)
    tokenizer = AutoTokenizer.from_pretrained(case.path)
    export_merged(svfit_model, tokenizer, tmp_path)

    reloaded = type(case.load()).from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded.eval(), batch), expected, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == tokenizer.get_vocab()
    # the SVFitModel was not merged in place
    assert not any(layer.merged for layer in svfit_model.svfit_layers().values())
    assert torch.equal(logits(svfit_model, batch), expected)


# -- a BERT classifier's pooler: trained in full with the head, saved, exported and merged with it ---------


def _pooler(model) -> torch.Tensor:
    return model.get_submodule("bert.pooler.dense").weight.detach().clone()


def test_bert_pooler_is_saved_exported_and_merged_with_the_head(tiny_case_factory, tmp_path):
    from peft import PeftModel

    case = tiny_case_factory("bert", "classification")
    svfit_model = inject_svfit(case.load(), SVFitConfig())
    assert svfit_model.modules_to_save == ["bert.pooler", "classifier"]
    perturb(svfit_model)  # moves every saved parameter, the pooler's included
    trained = _pooler(svfit_model.model)
    assert not torch.equal(trained, _pooler(case.load()))
    batch = case.batch()
    expected = logits(svfit_model, batch)

    save_svfit_adapter(svfit_model, tmp_path / "native")
    config = json.loads((tmp_path / "native" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["bert.pooler", "classifier"]
    loaded = load_svfit_adapter(case.load(), tmp_path / "native")
    assert torch.equal(_pooler(loaded.model), trained)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)

    export_peft_lora(svfit_model, tmp_path / "peft")
    assert "bert.pooler" in json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"]
    peft_model = PeftModel.from_pretrained(case.load(), tmp_path / "peft").eval()
    wrapper = peft_model.get_submodule("base_model.model.bert.pooler")
    assert torch.equal(wrapper.modules_to_save["default"].dense.weight, trained)
    torch.testing.assert_close(logits(peft_model, batch), expected, atol=1e-5, rtol=0)

    export_merged(svfit_model, None, tmp_path / "merged")
    merged = type(case.load()).from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(_pooler(merged), trained)
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)


def test_adapter_saved_before_the_pooler_trained_loads_as_before(tiny_case_factory, tmp_path):
    case = tiny_case_factory("bert", "classification")
    # What an adapter saved before pooler training looked like: only the classifier saved whole.
    old = inject_svfit(case.load(), SVFitConfig(modules_to_save=["classifier"]))
    perturb(old)
    batch = case.batch()
    expected = logits(old, batch)
    save_svfit_adapter(old, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]

    loaded = load_svfit_adapter(case.load(), tmp_path, is_trainable=True)
    assert loaded.modules_to_save == ["classifier"]
    pooler = loaded.model.get_submodule("bert.pooler")
    assert not any(p.requires_grad for p in pooler.parameters())  # resumed, it stays frozen
    assert torch.equal(_pooler(loaded.model), _pooler(case.load()))
    torch.testing.assert_close(logits(loaded.eval(), batch), expected, atol=1e-5, rtol=0)


def test_a_target_inside_the_pooler_is_left_to_it(tiny_case_factory):
    model = tiny_case_factory("bert", "classification").load()
    svfit_model = inject_svfit(model, SVFitConfig(target_modules=["dense"], rank=4))
    assert svfit_model.svfit_layers() and not [n for n in svfit_model.svfit_layers() if ".pooler." in n]
    assert all(p.requires_grad for p in svfit_model.model.get_submodule("bert.pooler").parameters())
    with pytest.raises(ConfigError) as info:  # nothing left to adapt: a conflict, as for the head itself
        inject_svfit(tiny_case_factory("bert", "classification").load(), SVFitConfig(target_modules=["pooler.dense"]))
    assert info.value.code == "invalid_modules_to_save"


EXPECTED_ALL_LINEAR = {"gpt2": 4, "llama": 7, "bert": 6}  # linear layers per block
FORBIDDEN = ("wte", "wpe", "embed", "lm_head", "classifier", "score", "pooler")


@pytest.mark.parametrize(
    "arch,task", [("gpt2", "causal"), ("llama", "classification"), ("bert", "classification")]
)
def test_all_linear_stays_inside_the_blocks(tiny_case_factory, arch, task):
    model = tiny_case_factory(arch, task).load()
    names = resolve_targets(model, "all-linear")
    prefixes = block_prefixes(model)
    assert all(any(n.startswith(p + ".") for p in prefixes) for n in names)
    assert not [n for n in names if any(f in n for f in FORBIDDEN)]
    assert len(names) == 2 * EXPECTED_ALL_LINEAR[arch]
    svfit_model = inject_svfit(model, SVFitConfig(target_modules="all-linear", rank=4))
    assert set(svfit_model.ranks.values()) == {4}


def test_target_spec_forms_agree(tiny_case_factory):
    model = tiny_case_factory("llama", "causal").load()
    by_list = resolve_targets(model, ["q_proj", "v_proj"])
    by_regex = resolve_targets(model, r".*\.(q|v)_proj")
    assert by_list == by_regex == resolve_targets(model, None)
    assert len(by_list) == 4


def test_generate_is_forwarded_and_unchanged_at_init(tiny_case_factory):
    case = tiny_case_factory("llama", "causal")
    ids = case.batch()["input_ids"][:1]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = case.load().generate(ids, **kwargs)
    svfit_model = inject_svfit(case.load(), SVFitConfig())
    assert torch.equal(svfit_model.generate(ids, **kwargs), expected)
    assert svfit_model.config.model_type == "llama"
