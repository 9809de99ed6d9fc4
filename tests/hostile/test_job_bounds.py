"""Job creation with every parameter at and beyond its bounds: each is a 400 in the error envelope naming
the exact field (`param`), and none creates a job or reaches the queue.

Bodies are sent as JSON text, so NaN, Infinity and `1e999` (which Python's json reads as inf) arrive as a
client could send them. The base model here has a config.json with a width of 64, so a rank above 64 is
one no matrix of it can have.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.api.conftest import Api, _build_api, chat_file, preference_file
from tests.hostile.conftest import assert_envelope, row_counts
from tests.hostile.raw_json import Raw, body_text

MODEL = "wide-64"
WIDTH = 64


@dataclass
class Bounds:
    """The app every case posts to, and the files a job could name (by role)."""

    api: Api
    files: dict[str, str]  # "training" (alpha's, valid), "beta_file" (beta's), "error_file" (alpha's, bad),
    # "preference" (alpha's, valid, for DPO)


@pytest.fixture(scope="module")
def bounds(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite_template) -> Iterator[Bounds]:  # noqa: ANN001
    """One app for the whole table (each case is one refused POST), with a base model of known width."""
    root = tmp_path_factory.mktemp("bounds")
    models = root / "models"
    (models / MODEL).mkdir(parents=True)
    (models / MODEL / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": WIDTH}))
    shutil.copyfile(migrated_sqlite_template, root / "svfit.db")
    api = _build_api(root, f"sqlite:///{root / 'svfit.db'}", models_dir=models)
    with api.client:
        files = {
            "training": api.upload_ok(chat_file(5)),
            "beta_file": api.upload_ok(chat_file(5), org="beta"),
            "error_file": api.upload(b"{oops\n").json()["id"],
            "preference": api.upload_ok(preference_file(5)),
        }
        yield Bounds(api, files)
    api.app.state.engine.dispose()


def hp(**values: Any) -> dict:
    return {"hyperparameters": values}


def peft(**values: Any) -> dict:
    return {"peft": values}


H = "hyperparameters."
P = "peft."

# (case id, body overrides, param). Every one must be refused with that param.
CASES: list[tuple[str, dict, str]] = [
    # epochs
    ("epochs_negative", hp(n_epochs=-1), H + "n_epochs"),
    ("epochs_zero", hp(n_epochs=0), H + "n_epochs"),
    ("epochs_above_max", hp(n_epochs=51), H + "n_epochs"),
    ("epochs_huge", hp(n_epochs=10**30), H + "n_epochs"),
    ("epochs_400_digits", hp(n_epochs=Raw("9" * 400)), H + "n_epochs"),
    ("epochs_1e999", hp(n_epochs=Raw("1e999")), H + "n_epochs"),
    ("epochs_nan", hp(n_epochs=float("nan")), H + "n_epochs"),
    ("epochs_fraction", hp(n_epochs=2.5), H + "n_epochs"),
    ("epochs_string", hp(n_epochs="3"), H + "n_epochs"),
    ("epochs_bool", hp(n_epochs=True), H + "n_epochs"),
    ("epochs_list", hp(n_epochs=[3]), H + "n_epochs"),
    ("epochs_in_method", {"method": {"type": "supervised", "supervised": hp(n_epochs=0)}},
     "method.supervised.hyperparameters.n_epochs"),
    ("epochs_conflicting", {**hp(n_epochs=2), "method": {"type": "supervised", "supervised": hp(n_epochs=3)}},
     H + "n_epochs"),
    # batch size
    ("batch_zero", hp(batch_size=0), H + "batch_size"),
    ("batch_negative", hp(batch_size=-8), H + "batch_size"),
    ("batch_above_max", hp(batch_size=257), H + "batch_size"),
    ("batch_infinity", hp(batch_size=float("inf")), H + "batch_size"),
    # learning rate multiplier
    ("lr_zero", hp(learning_rate_multiplier=0), H + "learning_rate_multiplier"),
    ("lr_negative", hp(learning_rate_multiplier=-0.5), H + "learning_rate_multiplier"),
    ("lr_nan", hp(learning_rate_multiplier=float("nan")), H + "learning_rate_multiplier"),
    ("lr_infinity", hp(learning_rate_multiplier=float("inf")), H + "learning_rate_multiplier"),
    ("lr_minus_infinity", hp(learning_rate_multiplier=float("-inf")), H + "learning_rate_multiplier"),
    ("lr_1e999", hp(learning_rate_multiplier=Raw("1e999")), H + "learning_rate_multiplier"),
    ("lr_400_digits", hp(learning_rate_multiplier=Raw("9" * 400)), H + "learning_rate_multiplier"),
    ("lr_string", hp(learning_rate_multiplier="fast"), H + "learning_rate_multiplier"),
    ("lr_bool", hp(learning_rate_multiplier=True), H + "learning_rate_multiplier"),
    # rank: at least 1, at most the width of the model (min(m, n) of its widest matrix)
    ("rank_zero", peft(rank=0), P + "rank"),
    ("rank_negative", peft(rank=-4), P + "rank"),
    ("rank_above_width", peft(rank=WIDTH + 1), P + "rank"),
    ("rank_huge", peft(rank=10**9), P + "rank"),
    ("rank_lora_above_width", peft(type="lora", rank=WIDTH * 2), P + "rank"),
    ("rank_fraction", peft(rank=1.5), P + "rank"),
    ("rank_string", peft(rank="8"), P + "rank"),
    ("rank_bool", peft(rank=True), P + "rank"),
    ("rank_nan", peft(rank=float("nan")), P + "rank"),
    # energy τ in (0, 1]
    ("energy_zero", peft(energy=0), P + "energy"),
    ("energy_negative", peft(energy=-0.1), P + "energy"),
    ("energy_above_one", peft(energy=1.0001), P + "energy"),
    ("energy_nan", peft(energy=float("nan")), P + "energy"),
    ("energy_infinity", peft(energy=float("inf")), P + "energy"),
    ("energy_string", peft(energy="0.9"), P + "energy"),
    ("energy_400_digits", peft(energy=Raw("9" * 400)), P + "energy"),
    # band: SVFit's banded coupling, 0 to 8 off-diagonals per side, svfit only
    ("band_negative", peft(band=-1), P + "band"),
    ("band_too_wide", peft(band=9), P + "band"),
    ("band_fraction", peft(band=1.5), P + "band"),
    ("band_bool", peft(band=True), P + "band"),
    ("band_lora", peft(type="lora", band=1), P + "band"),
    # method type and options
    ("peft_unknown_type", peft(type="qlora"), P + "type"),
    ("peft_empty_type", peft(type=""), P + "type"),
    ("peft_type_number", peft(type=5), P + "type"),
    ("peft_not_object", {"peft": "svfit"}, "peft"),
    ("lora_alpha_zero", peft(type="lora", alpha=0), P + "alpha"),
    ("lora_alpha_nan", peft(type="lora", alpha=float("nan")), P + "alpha"),
    ("targets_empty_list", peft(target_modules=[]), P + "target_modules"),
    ("targets_empty_string", peft(target_modules=""), P + "target_modules"),
    ("targets_blank_name", peft(target_modules=["q_proj", ""]), P + "target_modules"),
    ("targets_numbers", peft(target_modules=[1, 2]), P + "target_modules"),
    ("targets_object", peft(target_modules={"q_proj": True}), P + "target_modules"),
    ("max_seq_length_zero", peft(max_seq_length=0), P + "max_seq_length"),
    ("max_seq_length_400_digits", peft(max_seq_length=Raw("9" * 400)), P + "max_seq_length"),
    ("max_steps_above_int32", peft(max_steps=2**31), P + "max_steps"),
    ("checkpoint_every_negative", peft(checkpoint_every=-1), P + "checkpoint_every"),
    ("warmup_ratio_one", peft(warmup_ratio=1), P + "warmup_ratio"),
    ("warmup_ratio_nan", peft(warmup_ratio=float("nan")), P + "warmup_ratio"),
    ("weight_decay_negative", peft(weight_decay=-1), P + "weight_decay"),
    ("gpus_zero", peft(gpus=0), P + "gpus"),
    ("gpus_fraction", peft(gpus=1.5), P + "gpus"),
    ("gpus_string", peft(gpus="2"), P + "gpus"),
    ("gpus_bool", peft(gpus=True), P + "gpus"),
    ("scheduler_unknown", peft(lr_scheduler="exponential"), P + "lr_scheduler"),
    ("method_unknown", {"method": {"type": "rlhf"}}, "method.type"),
    ("method_reinforcement", {"method": {"type": "reinforcement"}}, "method.reinforcement.grader"),
    ("method_not_string", {"method": {"type": ["dpo"]}}, "method.type"),
    ("method_dpo_on_chat_data", {"method": {"type": "dpo"}}, "training_file"),
    # what the job trains on
    ("model_unknown", {"model": "no-such-model"}, "model"),
    ("model_empty", {"model": ""}, "model"),
    ("model_traversal", {"model": "../../../etc"}, "model"),
    ("model_traversal_inside", {"model": f"{MODEL}/../{MODEL}"}, "model"),
    ("model_not_string", {"model": ["a"]}, "model"),
    ("seed_negative", {"seed": -1}, "seed"),
    ("seed_too_big", {"seed": 2**31}, "seed"),
    ("seed_fraction", {"seed": 1.5}, "seed"),
    ("suffix_colon", {"suffix": "a:b"}, "suffix"),
    ("suffix_too_long", {"suffix": "s" * 65}, "suffix"),
    ("suffix_empty", {"suffix": ""}, "suffix"),
    ("suffix_newline", {"suffix": "a\nb"}, "suffix"),
    ("metadata_too_many", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ("metadata_long_value", {"metadata": {"k": "v" * 513}}, "metadata.k"),
    ("metadata_not_string", {"metadata": {"k": 1}}, "metadata.k"),
]

B = "method.dpo.hyperparameters."


def dpo(**values: Any) -> dict:
    return {"method": {"type": "dpo", "dpo": hp(**values)}}


# (case id, body overrides, param) for a DPO job on preference data. Every one must be refused with that param.
DPO_CASES: list[tuple[str, dict, str]] = [
    ("beta_zero", dpo(beta=0), B + "beta"),
    ("beta_negative", dpo(beta=-1), B + "beta"),
    ("beta_above_max", dpo(beta=10.0001), B + "beta"),
    ("beta_nan", dpo(beta=float("nan")), B + "beta"),
    ("beta_infinity", dpo(beta=float("inf")), B + "beta"),
    ("beta_1e999", dpo(beta=Raw("1e999")), B + "beta"),
    ("beta_400_digits", dpo(beta=Raw("9" * 400)), B + "beta"),
    ("beta_string", dpo(beta="x"), B + "beta"),
    ("beta_bool", dpo(beta=True), B + "beta"),
    ("beta_list", dpo(beta=[0.1]), B + "beta"),
    ("dpo_epochs_zero", dpo(n_epochs=0), B + "n_epochs"),
    ("dpo_batch_above_max", dpo(batch_size=257), B + "batch_size"),
    ("dpo_lr_negative", dpo(learning_rate_multiplier=-1), B + "learning_rate_multiplier"),
    ("dpo_epochs_conflicting", {**hp(n_epochs=2), **dpo(n_epochs=3)}, H + "n_epochs"),
]

R = "method.reinforcement.grader"
EXACT = {"type": "string_check", "name": "e", "input": "{{sample.output_text}}", "reference": "a", "operation": "eq"}


def reinforcement(grader: Any) -> dict:
    return {"method": {"type": "reinforcement", "reinforcement": {"grader": grader}}}


def nested(depth: int) -> dict:
    grader = EXACT
    for _ in range(depth):
        grader = {"type": "multi", "name": "m", "graders": {"g": grader}, "calculate_output": "g"}
    return grader


# (case id, body overrides, param, code): a reinforcement job's grader, refused with the graders library's code
# and the full path of the field, before the method itself is.
GRADER_CASES: list[tuple[str, dict, str, str]] = [
    ("grader_python", reinforcement({"type": "python", "name": "p", "source": "import os"}), R + ".type",
     "grader_not_supported"),
    ("grader_type_unknown", reinforcement({**EXACT, "type": "regex"}), R + ".type", "invalid_grader"),
    ("grader_unknown_field", reinforcement({**EXACT, "extra": 1}), R + ".extra", "invalid_grader"),
    ("grader_template_unclosed", reinforcement({**EXACT, "input": "{{sample.output_text"}), R + ".input",
     "invalid_template"),
    ("grader_formula_nan", reinforcement({"type": "multi", "name": "m", "graders": {"e": EXACT},
                                          "calculate_output": "e * nan"}), R + ".calculate_output", "invalid_formula"),
    ("grader_nested_too_deep", reinforcement(nested(4)), R + ".graders.g.graders.g.graders.g", "grader_too_large"),
    ("grader_image_input", reinforcement({"type": "score_model", "name": "s", "model": MODEL, "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}),
     R + ".input[0].content[0].type", "grader_not_supported"),
    ("grader_range_inverted", reinforcement({"type": "score_model", "name": "s", "model": MODEL, "range": [1, 0],
                                             "input": [{"role": "user", "content": "x"}]}), R + ".range",
     "invalid_grader"),
]

FILE_CASES: list[tuple[str, str, str]] = [
    # (case id, which file, param): the file the job would read is not one it may use.
    ("training_other_org", "beta_file", "training_file"),
    ("training_unknown", "file-000000000000000000000000", "training_file"),
    ("training_error_status", "error_file", "training_file"),
    ("training_empty_id", "", "training_file"),
    ("training_traversal", "../../store/files", "training_file"),
    ("validation_other_org", "beta_file", "validation_file"),
]


def _post(api: Api, body: dict) -> Any:
    return api.client.post(
        "/v1/fine_tuning/jobs",
        content=body_text(body),
        headers={**api.headers(), "Content-Type": "application/json"},
    )


def _assert_refused(api: Api, response: Any, param: str) -> None:
    error = assert_envelope(response, 400, param=param)
    assert error["code"] in {"invalid_parameter", "missing_parameter", "model_not_found", "invalid_training_file"}
    assert len(error["message"]) < 400, error["message"]  # a 400-digit number is not echoed back whole
    assert row_counts(api)["jobs"] == 0 and api.dispatch.job_ids == []


@pytest.mark.parametrize(("overrides", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_out_of_bounds_job_parameters_are_400_naming_the_field(bounds: Bounds, overrides: dict, param: str):
    body = {"model": MODEL, "training_file": bounds.files["training"], **overrides}
    _assert_refused(bounds.api, _post(bounds.api, body), param)


@pytest.mark.parametrize(("overrides", "param"), [c[1:] for c in DPO_CASES], ids=[c[0] for c in DPO_CASES])
def test_out_of_bounds_dpo_parameters_are_400_naming_the_field(bounds: Bounds, overrides: dict, param: str):
    body = {"model": MODEL, "training_file": bounds.files["preference"], **overrides}
    _assert_refused(bounds.api, _post(bounds.api, body), param)


@pytest.mark.parametrize(("overrides", "param", "code"), [c[1:] for c in GRADER_CASES],
                         ids=[c[0] for c in GRADER_CASES])
def test_a_reinforcement_jobs_bad_grader_is_400_naming_its_field(bounds: Bounds, overrides: dict, param: str,
                                                                   code: str):
    body = {"model": MODEL, "training_file": bounds.files["training"], **overrides}
    error = assert_envelope(_post(bounds.api, body), 400, code, param)
    assert len(error["message"]) < 400, error["message"]
    assert row_counts(bounds.api)["jobs"] == 0 and bounds.api.dispatch.job_ids == []


@pytest.mark.parametrize(("which", "param"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_unusable_files_are_400_naming_the_field(bounds: Bounds, which: str, param: str):
    body = {"model": MODEL, "training_file": bounds.files["training"], param: bounds.files.get(which, which)}
    _assert_refused(bounds.api, _post(bounds.api, body), param)


@pytest.mark.parametrize(
    "overrides",
    [hp(n_epochs=1), hp(n_epochs=50), hp(batch_size=1), hp(batch_size=256), peft(rank=1), peft(rank=WIDTH),
     peft(energy=1), peft(energy=1e-9), hp(learning_rate_multiplier=1e-12), peft(type="lora", rank=WIDTH),
     {"seed": 0}, {"seed": 2**31 - 1}, {"suffix": "s" * 64}],
    ids=["epochs_1", "epochs_50", "batch_1", "batch_256", "rank_1", "rank_width", "energy_1", "energy_tiny",
         "lr_tiny", "lora_rank_width", "seed_0", "seed_max", "suffix_64"],
)
def test_values_at_the_bounds_are_accepted(make_api, tmp_path, overrides: dict):
    models = tmp_path / "bounds-models"
    (models / MODEL).mkdir(parents=True)
    (models / MODEL / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": WIDTH}))
    api = make_api(models_dir=models)
    response = _post(api, {"model": MODEL, "training_file": api.upload_ok(chat_file(5)), **overrides})
    assert response.status_code == 200, response.text
    assert api.dispatch.job_ids == [response.json()["id"]]


def test_a_model_without_a_known_width_leaves_the_rank_to_the_library(api):
    """The fixture's base model has a config.json without a width: any rank ≥ 1 is accepted (training caps
    it per matrix at min(m, n))."""
    response = api.create_job(peft={"rank": 10**6})
    assert response.status_code == 200, response.text
    assert response.json()["peft"]["rank"] == 10**6
