"""The typed errors of the SVFit core: each bad input fails with its class, its code and a useful message."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from svfit_core import (
    AdapterFormatError,
    BaseModelMismatchError,
    ConfigError,
    NonFiniteMergeError,
    SVFitConfig,
    SVFitError,
    SVFitLayer,
    TargetModulesNotFoundError,
    UnsupportedLayerError,
    export_merged,
    export_peft_lora,
    inject_svfit,
    load_svfit_adapter,
    save_svfit_adapter,
)
from svfit_core import errors

ERROR_CLASSES = [
    obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, SVFitError)
]


def test_every_error_has_a_stable_snake_case_code():
    codes = [cls.code for cls in ERROR_CLASSES]
    assert len(codes) == len(set(codes))
    assert all(code.replace("_", "").isalpha() and code.islower() for code in codes)


@pytest.mark.parametrize(
    "kwargs,code",
    [
        (dict(rank=0), "invalid_rank"),
        (dict(rank=-3), "invalid_rank"),
        (dict(rank=2.5), "invalid_rank"),
        (dict(rank=True), "invalid_rank"),
        (dict(energy=0.0), "invalid_energy"),
        (dict(energy=1.01), "invalid_energy"),
        (dict(energy=float("nan")), "invalid_energy"),
        (dict(energy="0.9"), "invalid_energy"),
        (dict(energy_measure="cubic"), "invalid_energy_measure"),
        (dict(band=-1), "invalid_band"),
        (dict(band=9), "invalid_band"),
        (dict(band=True), "invalid_band"),
        (dict(band=1.0), "invalid_band"),
        (dict(target_modules=[]), "invalid_target_modules"),
        (dict(target_modules=""), "invalid_target_modules"),
        (dict(target_modules="q_proj("), "invalid_target_modules"),
        (dict(target_modules=[3]), "invalid_target_modules"),
        (dict(modules_to_save="classifier"), "invalid_modules_to_save"),
    ],
)
def test_invalid_config(kwargs, code):
    with pytest.raises(ConfigError) as info:
        SVFitConfig(**kwargs)
    assert info.value.code == code
    assert isinstance(info.value, SVFitError) and isinstance(info.value, ValueError)


def test_target_that_matches_nothing_lists_existing_linear_modules(tiny_case_factory):
    model = tiny_case_factory("llama", "causal").load()
    with pytest.raises(TargetModulesNotFoundError) as info:
        inject_svfit(model, SVFitConfig(target_modules=["q_proj", "qq_proj"]))
    err = info.value
    assert err.code == "target_modules_not_found"
    assert err.missing == ["qq_proj"]
    assert "model.layers.0.self_attn.q_proj" in err.available
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert leaf in str(err)
    # nothing was replaced
    assert not any("base_layer" in n for n, _ in model.named_modules())


def test_regex_must_fully_match(tiny_case_factory):
    model = tiny_case_factory("gpt2", "causal").load()
    with pytest.raises(TargetModulesNotFoundError):
        inject_svfit(model, SVFitConfig(target_modules="c_attn"))  # a full match over full names
    assert len(inject_svfit(model, SVFitConfig(target_modules=r".*\.c_attn")).ranks) == 2


def test_missing_modules_to_save_and_unknown_architecture(tiny_case_factory):
    model = tiny_case_factory("bert", "classification").load()
    with pytest.raises(TargetModulesNotFoundError):
        inject_svfit(model, SVFitConfig(modules_to_save=["head"]))
    with pytest.raises(ConfigError) as info:
        inject_svfit(nn.Sequential(nn.Linear(4, 4)))
    assert info.value.code == "no_default_targets"


def test_target_cannot_also_be_a_saved_module(tiny_case_factory):
    model = tiny_case_factory("bert", "classification").load()
    with pytest.raises(ConfigError) as info:
        inject_svfit(model, SVFitConfig(target_modules=["classifier"]))
    assert info.value.code == "invalid_modules_to_save"


def test_double_injection_is_refused(tiny_case_factory):
    svfit_model = inject_svfit(tiny_case_factory("gpt2", "causal").load())
    for target in (svfit_model, svfit_model.model):
        with pytest.raises(ConfigError) as info:
            inject_svfit(target)
        assert info.value.code == "already_injected"


class Linear4bit(nn.Linear):
    """Stands in for bitsandbytes' class (not installed here): an nn.Linear whose weight is packed uint8."""


class Linear8bitLt(nn.Linear):
    """Stands in for bitsandbytes' int8 linear, here with a float weight: the class alone refuses it."""


def _quantized(layer: nn.Linear, kind: str) -> nn.Linear:
    out_f, in_f = layer.weight.shape
    if kind == "int8":  # a plain Linear holding int8 rows
        new = nn.Linear(in_f, out_f, bias=False)
        new.weight = nn.Parameter(torch.ones(out_f, in_f, dtype=torch.int8), requires_grad=False)
    elif kind == "Linear4bit":  # two 4-bit values per byte, flattened as bitsandbytes stores them
        new = Linear4bit(in_f, out_f, bias=False)
        new.weight = nn.Parameter(torch.ones(out_f * in_f // 2, 1, dtype=torch.uint8), requires_grad=False)
    else:
        new = Linear8bitLt(in_f, out_f, bias=False)
    return new


@pytest.mark.parametrize("kind", ["int8", "Linear4bit", "Linear8bitLt"])
def test_quantized_targets_are_refused_before_any_svd(tiny_case_factory, kind, monkeypatch):
    model = tiny_case_factory("llama", "causal").load()
    name = "model.layers.1.self_attn.v_proj"
    model.model.layers[1].self_attn.v_proj = _quantized(model.model.layers[1].self_attn.v_proj, kind)

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD ran before the refusal")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)  # q_proj comes first and is fine: checked all the same
    with pytest.raises(UnsupportedLayerError) as info:
        inject_svfit(model, SVFitConfig(target_modules=["q_proj", "v_proj"]))
    assert info.value.code == "unsupported_layer"
    assert info.value.module == name and name in str(info.value)
    assert info.value.layer_type == type(model.get_submodule(name)).__name__
    assert info.value.layer_type in str(info.value)
    assert not any(isinstance(m, SVFitLayer) for m in model.modules())


def test_an_adapter_is_refused_on_a_quantized_base(tiny_case_factory, tmp_path):
    case = tiny_case_factory("llama", "causal")
    _saved_adapter(case, tmp_path)
    base = case.load()
    base.model.layers[0].self_attn.q_proj = _quantized(base.model.layers[0].self_attn.q_proj, "Linear4bit")
    with pytest.raises(UnsupportedLayerError) as info:
        load_svfit_adapter(base, tmp_path)
    assert info.value.module == "model.layers.0.self_attn.q_proj"


def _saved_adapter(case, tmp_path, **config):
    svfit_model = inject_svfit(case.load(), SVFitConfig(**config))
    save_svfit_adapter(svfit_model, tmp_path)
    return svfit_model


@pytest.mark.parametrize("store_bases", [True, False], ids=["bases", "compact"])
def test_other_weights_are_refused_by_hash(tiny_case_factory, tmp_path, store_bases):
    case = tiny_case_factory("llama", "causal")
    _saved_adapter(case, tmp_path, store_bases=store_bases)
    other = case.load()
    with torch.no_grad():
        other.model.layers[1].self_attn.v_proj.weight[0, 0] += 1e-3
    with pytest.raises(BaseModelMismatchError) as info:
        load_svfit_adapter(other, tmp_path)
    assert info.value.code == "weight_hash_mismatch"
    assert info.value.module == "model.layers.1.self_attn.v_proj"
    assert "model.layers.1.self_attn.v_proj" in str(info.value)
    # an explicit opt-out loads anyway (e.g. a re-quantised base)
    assert load_svfit_adapter(other, tmp_path, verify_base=False).ranks


def test_other_architecture_and_other_shapes_are_refused(tiny_case_factory, tmp_path):
    gpt2 = tiny_case_factory("gpt2", "causal")
    _saved_adapter(gpt2, tmp_path)
    with pytest.raises(BaseModelMismatchError) as info:
        load_svfit_adapter(tiny_case_factory("llama", "causal").load(), tmp_path)
    assert info.value.code == "module_missing"
    assert info.value.module == "transformer.h.0.attn.c_attn"

    wider = GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=2, n_head=2, n_positions=64, vocab_size=96))
    with pytest.raises(BaseModelMismatchError) as info:
        load_svfit_adapter(wider, tmp_path)
    assert info.value.code == "shape_mismatch"


def test_broken_artifacts_raise_adapter_format_error(tiny_case_factory, tmp_path):
    case = tiny_case_factory("gpt2", "causal")
    with pytest.raises(AdapterFormatError):
        load_svfit_adapter(case.load(), tmp_path / "nowhere")

    _saved_adapter(case, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for bad in ({**good, "method": "lora"}, {**good, "format_version": 99}):
        config_path.write_text(json.dumps(bad))
        with pytest.raises(AdapterFormatError):
            load_svfit_adapter(case.load(), tmp_path)
    config_path.write_text(json.dumps(good))

    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["svfit.transformer.h.1.attn.c_attn.sigma"]
    save_file(tensors, str(weights))
    with pytest.raises(AdapterFormatError) as info:
        load_svfit_adapter(case.load(), tmp_path)
    assert "transformer.h.1.attn.c_attn.sigma" in str(info.value)


def test_non_finite_merge_leaves_weights_untouched(tiny_case_factory, tmp_path):
    svfit_model = inject_svfit(tiny_case_factory("gpt2", "causal").load())
    layers = svfit_model.svfit_layers()
    name = "transformer.h.1.attn.c_attn"
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    with torch.no_grad():
        layers[name].sigma[0] = float("inf")
    with pytest.raises(NonFiniteMergeError) as info:
        svfit_model.merge()
    assert info.value.module == name and info.value.code == "non_finite_merge"
    assert torch.equal(layers[name].base_layer.weight, before[name])
    assert not layers[name].merged
    with pytest.raises(NonFiniteMergeError):
        export_merged(svfit_model, None, tmp_path)


def test_lora_export_refuses_ranks_above_every_allowed_rank(tiny_case_factory, tmp_path):
    svfit_model = inject_svfit(tiny_case_factory("gpt2", "causal").load())  # r = 32
    with pytest.raises(ConfigError) as info:
        export_peft_lora(svfit_model, tmp_path, allowed_ranks=[8, 16])
    assert info.value.code == "rank_not_allowed"
