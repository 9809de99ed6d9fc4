"""The job-spec contract (api/core/job_spec.py): a request becomes the stored spec and the stored spec the
library's PeftSpec / TrainConfig; the learning rates are the library's; the library's validators refuse bad
values at creation, as a 400 naming the request's field; the "auto" rules."""

from __future__ import annotations

import math

import pytest

from api.core.errors import InvalidGrader, InvalidParameter, InvalidTrainingFile, MissingParameter
from api.core.job_spec import (
    DEFAULT_DPO_BETA,
    LIBRARY_NAMES,
    MIN_AUTO_STEPS,
    PEFT_TYPES,
    SPEC_OPTIONS,
    TRAIN_OPTIONS,
    auto_batch_size,
    auto_n_epochs,
    check_file_fits_method,
    check_method_type,
    peft_spec,
    resolve_request,
    stored_method,
    train_config,
)
from svfit_core.training.run_config import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_LORA_RANK,
    DEFAULT_SVFIT_RANK,
    DEFAULT_TARGET_MODULES,
    HyperparameterError,
    PeftSpec,
    TrainConfig,
)


def round_trip(peft: dict | None, hyperparameters: dict | None = None, *, checkpoint_every: int | None = 50):
    """request -> stored -> library, as job creation and then the worker do it (with the stored JSON kept)."""
    stored_peft, stored_hyper = resolve_request(peft, hyperparameters, n_examples=40)
    spec = peft_spec(stored_peft)
    config = train_config(stored_hyper, stored_peft, seed=7, default_checkpoint_every=checkpoint_every)
    spec.validate()
    config.validate()
    return stored_peft, stored_hyper, spec, config


def test_svfit_round_trip():
    stored, hyper, spec, config = round_trip(
        {"rank": 4.0, "target_modules": ["q_proj"], "energy_measure": "linear", "train_bottom": True,
         "max_seq_length": 64, "checkpoint_every": 3, "warmup_ratio": 0.2, "lr_scheduler": "cosine", "bogus": 1},
        {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5},
    )
    assert stored == {
        "type": "svfit", "rank": 4, "energy": None, "target_modules": ["q_proj"], "energy_measure": "linear",
        "train_bottom": True, "max_seq_length": 64, "checkpoint_every": 3, "warmup_ratio": 0.2, "lr_scheduler": "cosine",
    }
    assert hyper == {
        "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5,
        "learning_rate": 0.5 * DEFAULT_LEARNING_RATE["svfit"],
    }
    assert spec == PeftSpec(method="svfit", rank=4, target_modules=["q_proj"], energy_measure="linear", train_bottom=True)
    assert config == TrainConfig(
        n_epochs=2, batch_size=4, learning_rate=0.5 * DEFAULT_LEARNING_RATE["svfit"], seed=7, max_seq_length=64,
        checkpoint_every=3, warmup_ratio=0.2, lr_scheduler="cosine",
    )


def test_svfit_band_is_stored_as_a_whole_number_and_reaches_the_library():
    stored, _, spec, _ = round_trip({"type": "svfit", "band": 2.0})
    assert stored["band"] == 2 and isinstance(stored["band"], int) and spec.band == 2
    stored, _, spec, _ = round_trip({})
    assert "band" not in stored and spec.band == 0


def test_a_banded_svfit_job_stores_and_echoes_its_band(api):
    response = api.create_job(peft={"type": "svfit", "band": 1})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["peft"]["band"] == 1
    again = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=api.headers())
    assert again.status_code == 200 and again.json()["peft"]["band"] == 1
    refused = api.create_job(peft={"type": "svfit", "band": 9})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "peft.band"


def test_svfit_energy_is_stored_as_a_float():
    stored, _, spec, _ = round_trip({"energy": 1})
    assert stored["energy"] == 1.0 and isinstance(stored["energy"], float) and spec.energy == 1.0


def test_lora_round_trip_decides_the_library_defaults_at_creation():
    stored, _, spec, config = round_trip({"type": "lora", "energy": 0.5})  # energy is svfit's: dropped
    assert stored == {"type": "lora", "rank": DEFAULT_LORA_RANK, "alpha": 2.0 * DEFAULT_LORA_RANK,
                      "target_modules": DEFAULT_TARGET_MODULES}
    assert spec == PeftSpec(method="lora", rank=DEFAULT_LORA_RANK, lora_alpha=2.0 * DEFAULT_LORA_RANK,
                            target_modules=DEFAULT_TARGET_MODULES)
    assert config.learning_rate == DEFAULT_LEARNING_RATE["lora"] and config.checkpoint_every == 50

    stored, _, spec, _ = round_trip({"type": "lora", "rank": 4, "alpha": 8, "target_modules": "all-linear"})
    assert stored == {"type": "lora", "rank": 4, "alpha": 8.0, "target_modules": "all-linear"}
    assert spec == PeftSpec(method="lora", rank=4, lora_alpha=8.0, target_modules="all-linear")


def test_full_round_trip_drops_the_adapter_options():
    stored, hyper, spec, config = round_trip({"type": "full", "rank": 4, "max_steps": 10}, checkpoint_every=None)
    assert stored == {"type": "full", "max_steps": 10}
    assert spec == PeftSpec(method="full")
    assert config.max_steps == 10 and config.checkpoint_every is None
    assert config.learning_rate == hyper["learning_rate"] == DEFAULT_LEARNING_RATE["full"]


def test_every_peft_option_is_a_field_of_the_library_class_that_receives_it():
    assert set(SPEC_OPTIONS) <= set(PeftSpec.__dataclass_fields__)
    assert {LIBRARY_NAMES.get(name, name) for name in TRAIN_OPTIONS} <= set(TrainConfig.__dataclass_fields__)


def test_gpus_is_stored_as_asked_and_becomes_the_library_world_size():
    stored, _, _, config = round_trip({"gpus": 4.0})
    assert stored["gpus"] == 4 and isinstance(stored["gpus"], int) and config.world_size == 4
    stored, _, _, config = round_trip({})
    assert "gpus" not in stored and config.world_size == 1


@pytest.mark.parametrize("peft_type", PEFT_TYPES)
def test_the_learning_rate_comes_from_the_library_table(monkeypatch, peft_type):
    # A copy of the table would not see this change.
    monkeypatch.setitem(DEFAULT_LEARNING_RATE, peft_type, 0.0123)
    _, hyper, _, config = round_trip({"type": peft_type}, {"learning_rate_multiplier": 2})
    assert hyper["learning_rate"] == config.learning_rate == pytest.approx(2 * 0.0123)


@pytest.mark.parametrize(
    ("peft", "hyperparameters", "param"),
    [
        ({"lr_scheduler": "exponential"}, None, "peft.lr_scheduler"),
        ({"energy_measure": "cubic"}, None, "peft.energy_measure"),
        ({"train_bottom": "yes"}, None, "peft.train_bottom"),
        ({"band": 9}, None, "peft.band"),
        ({"type": "lora", "band": 1}, None, "peft.band"),
        ({"gradient_checkpointing": 1}, None, "peft.gradient_checkpointing"),
        ({"max_steps": 2**31}, None, "peft.max_steps"),
        ({"gpus": 0}, None, "peft.gpus"),
        ({"gpus": 1.5}, None, "peft.gpus"),
        ({"max_seq_length": 64.5}, None, "peft.max_seq_length"),
        ({"head_learning_rate": float("inf")}, None, "peft.head_learning_rate"),
        ({"weight_decay": 10**400}, None, "peft.weight_decay"),
        ({"rank": 10**400}, None, "peft.rank"),
        ({"type": "lora", "alpha": -1}, None, "peft.alpha"),
        # 5e-324 x the method's rate underflows to a learning rate of 0.
        (None, {"learning_rate_multiplier": 5e-324}, "hyperparameters.learning_rate_multiplier"),
    ],
)
def test_library_rules_refuse_at_creation_naming_the_request_field(peft, hyperparameters, param):
    with pytest.raises(InvalidParameter) as info:
        resolve_request(peft, hyperparameters, n_examples=40)
    assert info.value.param == param
    assert len(info.value.message) < 200 and "Invalid" in info.value.message


def test_a_library_validation_error_is_a_400_naming_the_peft_field(api, monkeypatch):
    def refuse(spec: PeftSpec) -> None:
        raise HyperparameterError("energy_measure must be prime", param="energy_measure")

    monkeypatch.setattr(PeftSpec, "validate", refuse)
    response = api.create_job(peft={"energy_measure": "squared"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "peft.energy_measure" and error["type"] == "invalid_request_error"
    assert "energy_measure must be prime" in error["message"]
    assert not api.dispatch.job_ids


def test_a_library_rule_arrives_over_http_as_a_400(api):
    response = api.create_job(peft={"type": "lora", "alpha": 0})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "peft.alpha" and "lora_alpha must be" in error["message"]


def test_explicit_hyperparameters_are_kept_and_the_learning_rate_is_absolute():
    _, hyper = resolve_request({"type": "full"}, {"n_epochs": 4, "batch_size": 2.0, "learning_rate_multiplier": 2},
                               n_examples=50)
    assert hyper == {"n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 2.0,
                     "learning_rate": 2 * DEFAULT_LEARNING_RATE["full"]}


def test_method_block_errors_name_the_method_block():
    with pytest.raises(InvalidParameter) as info:
        resolve_request(None, {"batch_size": 0}, n_examples=40, param_prefix="method.supervised.hyperparameters")
    assert info.value.param == "method.supervised.hyperparameters.batch_size"


def test_peft_defaults_are_decided_at_creation():
    # The job stores what will run, so a later change of the library's defaults leaves it as created.
    assert resolve_request(None, None, n_examples=40)[0] == {
        "type": "svfit", "rank": DEFAULT_SVFIT_RANK, "energy": None, "target_modules": DEFAULT_TARGET_MODULES,
    }
    # An energy rule picks r per matrix: no rank is decided for it.
    assert resolve_request({"energy": 0.9}, None, n_examples=40)[0]["rank"] is None
    assert resolve_request({"target_modules": ["q_proj"]}, None, n_examples=40)[0]["target_modules"] == ["q_proj"]


@pytest.mark.parametrize(("n", "epochs"), [(1, 25), (10, 10), (20, 5), (34, 3), (1000, 3), (10_000, 2), (100_000, 1)])
def test_auto_epochs_follow_the_openai_rule(n, epochs):
    assert auto_n_epochs(n) == epochs


def test_auto_batch_size_is_a_bounded_power_of_two():
    assert auto_batch_size(100) == 8
    assert auto_batch_size(10_000) == 16
    assert auto_batch_size(10_000_000) == 256


@pytest.mark.parametrize(("n", "epochs", "batch"), [
    (32, 4, 4),  # 8 batches of 4 per epoch: 32 steps (batches of 8 gave 16)
    (10, 10, 3),  # 4 per epoch, 40 steps
    (50, 3, 4),  # 13 per epoch, 39 steps
    (100, 3, 8),  # 13 per epoch already: the usual rule stands
    (1, 25, 1),  # a single example cannot reach the minimum: one per step
    (3, 25, 2),  # 2 per epoch, 50 steps
])
def test_a_small_file_gets_a_smaller_auto_batch_for_enough_steps(n, epochs, batch):
    assert auto_batch_size(n, epochs) == batch
    steps = epochs * math.ceil(n / batch)
    assert steps >= MIN_AUTO_STEPS or batch == 1
    if batch < min(8, n):  # lowered from the usual rule: to the largest batch that still reaches the minimum
        assert epochs * math.ceil(n / (batch + 1)) < MIN_AUTO_STEPS


def test_the_auto_batch_size_follows_the_epochs_the_job_runs():
    # 64 examples: 3 auto epochs at batch 8 give 24 steps, so 6 (33 steps); 10 requested epochs give 80 at 8.
    assert resolve_request(None, None, n_examples=64)[1]["batch_size"] == 6
    assert resolve_request(None, {"n_epochs": 10}, n_examples=64)[1]["batch_size"] == 8
    assert resolve_request(None, {"batch_size": 16}, n_examples=64)[1]["batch_size"] == 16  # asked for: kept


# --- DPO -------------------------------------------------------------------------------------------------

DPO_PREFIX = "method.dpo.hyperparameters"


def dpo_round_trip(hyperparameters: dict | None, peft: dict | None = None):
    stored_peft, hyper = resolve_request(peft, hyperparameters, n_examples=40, param_prefix=DPO_PREFIX,
                                         method_type="dpo")
    config = train_config(hyper, stored_peft, seed=7, default_checkpoint_every=None)
    config.validate()
    return hyper, config


def test_dpo_beta_auto_is_the_default_and_reaches_the_library():
    assert DEFAULT_DPO_BETA == 0.1
    for requested in (None, {}, {"beta": "auto"}, {"beta": None}):
        hyper, config = dpo_round_trip(requested)
        assert hyper["beta"] == 0.1 and config.dpo_beta == 0.1
    hyper, config = dpo_round_trip({"beta": 2, "n_epochs": 3}, {"type": "lora"})
    assert hyper["beta"] == 2.0 and isinstance(hyper["beta"], float) and config.dpo_beta == 2.0
    assert config.n_epochs == 3
    assert stored_method("dpo", hyper) == {"type": "dpo", "dpo": {"hyperparameters": {
        "n_epochs": 3, "batch_size": hyper["batch_size"], "learning_rate_multiplier": 1.0, "beta": 2.0}}}


def test_a_supervised_job_has_no_beta_and_the_library_default():
    _, hyper = resolve_request(None, {"beta": 5}, n_examples=40)
    assert "beta" not in hyper
    assert train_config(hyper, {"type": "svfit"}, seed=0, default_checkpoint_every=None).dpo_beta == TrainConfig().dpo_beta
    assert stored_method("supervised", {**hyper, "beta": 1})["supervised"]["hyperparameters"].keys() == {
        "n_epochs", "batch_size", "learning_rate_multiplier"}


@pytest.mark.parametrize("beta", [0, -1, "x", float("nan"), float("inf"), 1e999, 10.5, True, [0.1], 10**400])
def test_a_bad_beta_is_refused_naming_the_field(beta):
    with pytest.raises(InvalidParameter) as info:
        dpo_round_trip({"beta": beta})
    assert info.value.param == "method.dpo.hyperparameters.beta"
    assert "beta" in info.value.message


def test_the_largest_beta_is_allowed():
    assert dpo_round_trip({"beta": 10})[0]["beta"] == 10.0


STRING_CHECK = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "x",
                "operation": "eq"}


@pytest.mark.parametrize(("method_type", "message"),
                         [("rlhf", "must be one of"), ("", "must be one of"), (None, "must be one of")])
def test_only_supervised_dpo_and_reinforcement_are_methods(method_type, message):
    assert check_method_type("supervised") == "supervised" and check_method_type("dpo") == "dpo"
    assert check_method_type("reinforcement", {"grader": STRING_CHECK}) == "reinforcement"
    with pytest.raises(InvalidParameter) as info:
        check_method_type(method_type, {"grader": STRING_CHECK})
    assert info.value.param == "method.type" and message in info.value.message


@pytest.mark.parametrize(("reinforcement", "error", "param", "code"), [
    (None, MissingParameter, "method.reinforcement.grader", "missing_parameter"),
    ({"grader": {"type": "python", "name": "p", "source": "x"}}, InvalidGrader, "method.reinforcement.grader.type",
     "grader_not_supported"),
    ({"grader": {**STRING_CHECK, "reference": "{{item.}}"}}, InvalidGrader, "method.reinforcement.grader.reference",
     "invalid_template"),
])
def test_a_reinforcement_grader_is_checked_with_the_method(reinforcement, error, param, code):
    with pytest.raises(error) as info:
        check_method_type("reinforcement", reinforcement)
    assert (info.value.param, info.value.code, info.value.status) == (param, code, 400)


@pytest.mark.parametrize(("method_type", "data_format", "refused"), [
    ("dpo", "preference", False), ("dpo", "chat", True), ("dpo", "completion", True), ("dpo", "classification", True),
    ("supervised", "preference", True), ("supervised", "chat", False), ("supervised", "classification", False),
])
def test_the_data_format_must_fit_the_method(method_type, data_format, refused):
    if not refused:
        check_file_fits_method(method_type, data_format, "file-x", param="training_file")
        return
    with pytest.raises(InvalidTrainingFile) as info:
        check_file_fits_method(method_type, data_format, "file-x", param="validation_file")
    assert info.value.param == "validation_file" and info.value.code == "invalid_training_file"
    assert ("preference data" in info.value.message) and "file-x" in info.value.message
