"""Fine-tuning jobs: creation (resolution, validation, idempotency, enqueue after commit), listing, and the
cancel / pause / resume transitions against the states a worker leaves."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, update

from api.core.job_spec import DPO_LEARNING_RATE_FACTOR, REINFORCEMENT_LEARNING_RATE_FACTOR
from api.core.tables import Job
from svfit_core.training.run_config import DEFAULT_LEARNING_RATE
from tests.api.conftest import BASE_MODEL, MIN_EXAMPLES, chat_file, jsonl, preference_file, prompt_file


def set_job(api, job_id: str, **values) -> None:
    """What the worker would write."""
    with api.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def job_count(api) -> int:
    with api.session() as session:
        return session.scalar(select(func.count()).select_from(Job))


def test_create_resolves_everything_and_enqueues_after_commit(any_db_api):
    api = any_db_api
    seen_committed = []

    def dispatch(job_id: str) -> None:
        # A worker must find the row the moment it receives the id: look from another session.
        with api.session() as session:
            seen_committed.append(session.scalar(select(Job.status).where(Job.id == job_id)))

    api.app.state.dispatch = dispatch
    job = api.job_ok(suffix="my-model", seed=7, metadata={"team": "nlp"})
    assert seen_committed == ["queued"]
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "queued" and job["queue_position"] == 1
    assert job["model"] == BASE_MODEL and job["organization_id"] == api.org_ids["alpha"]
    assert job["seed"] == 7 and job["metadata"] == {"team": "nlp"} and job["user_provided_suffix"] == "my-model"
    hyper = job["hyperparameters"]
    assert hyper["n_epochs"] >= 1 and hyper["batch_size"] >= 1 and hyper["learning_rate_multiplier"] == 1.0
    assert hyper["learning_rate"] == pytest.approx(DEFAULT_LEARNING_RATE["svfit"])
    assert job["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": {k: hyper[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}},
    }
    assert job["peft"] == {"type": "svfit", "rank": 256, "energy": None, "target_modules": "all-linear"}
    assert "beta" not in hyper  # a DPO job's only
    assert job["result_files"] == [] and job["error"] is None and job["fine_tuned_model"] is None
    assert job["progress"] == {"step": 0, "total_steps": None, "epoch": 0, "seconds_remaining": None}


def test_method_block_and_peft_extension(api):
    job = api.job_ok(
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}}},
        peft={"type": "lora", "rank": 4, "target_modules": ["q_proj", "v_proj"], "max_seq_length": 64, "bogus": 1},
    )
    assert job["hyperparameters"]["n_epochs"] == 2 and job["hyperparameters"]["batch_size"] == 4
    assert job["hyperparameters"]["learning_rate"] == pytest.approx(0.5 * DEFAULT_LEARNING_RATE["lora"])
    assert job["peft"] == {"type": "lora", "rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "max_seq_length": 64}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": "lots"}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 257}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
        ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier"),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 0}}}}, "method.supervised.hyperparameters.batch_size"),
        ({"method": {"type": "reinforcement"}}, "method.reinforcement.grader"),  # the grader first
        ({"method": {"type": "rlhf"}}, "method.type"),
        ({"method": {"type": "dpo"}}, "training_file"),  # a chat file: DPO needs preference data
        ({"peft": {"type": "adapter"}}, "peft.type"),
        ({"peft": {"rank": 0}}, "peft.rank"),
        ({"peft": {"energy": 1.5}}, "peft.energy"),
        ({"peft": {"energy": 0}}, "peft.energy"),
        ({"peft": {"target_modules": []}}, "peft.target_modules"),
        ({"peft": {"checkpoint_every": -3}}, "peft.checkpoint_every"),
        ({"suffix": "has:colon"}, "suffix"),
        ({"seed": -1}, "seed"),
        ({"model": "no-such-model"}, "model"),
        ({"training_file": "file-doesnotexist"}, "training_file"),
        ({"validation_file": "file-doesnotexist"}, "validation_file"),
    ],
)
def test_invalid_requests_name_the_parameter(api, body, param):
    response = api.create_job(**body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert not api.dispatch.job_ids


def test_unknown_model_is_model_not_found(api):
    error = api.create_job(model="gpt-nope").json()["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_found")


def test_error_file_and_too_small_file_cannot_train(api):
    error_file = api.upload(b"{broken\n").json()["id"]
    response = api.create_job(training_file=error_file)
    assert response.status_code == 400 and response.json()["error"]["param"] == "training_file"
    small = api.upload_ok(chat_file(MIN_EXAMPLES - 1))
    response = api.create_job(training_file=small)
    assert response.status_code == 400 and response.json()["error"]["param"] == "training_file"
    assert "at least" in response.json()["error"]["message"]
    assert job_count(api) == 0


def test_validation_file_must_match_the_training_format(api):
    classification = api.upload_ok(jsonl([{"text": "x", "label": 0}] * 4))
    response = api.create_job(validation_file=classification)
    assert response.status_code == 400 and response.json()["error"]["param"] == "validation_file"


# --- DPO ---------------------------------------------------------------------------------------------


def dpo(**hyperparameters) -> dict:  # noqa: ANN003
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}} if hyperparameters else {"type": "dpo"}


def test_a_dpo_job_resolves_beta_and_echoes_what_will_run(any_db_api):
    api = any_db_api
    preference = api.upload_ok(preference_file(6))
    job = api.job_ok(training_file=preference, method=dpo(n_epochs=2, learning_rate_multiplier=0.5),
                     peft={"type": "lora", "rank": 4})
    hyper = job["hyperparameters"]
    assert hyper["beta"] == 0.1 and hyper["n_epochs"] == 2 and hyper["learning_rate_multiplier"] == 0.5
    # DPO's rate at multiplier 1 is a multiple of the method's supervised default (job_spec).
    assert hyper["learning_rate"] == pytest.approx(0.5 * DPO_LEARNING_RATE_FACTOR["lora"] * DEFAULT_LEARNING_RATE["lora"])
    assert job["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "n_epochs": 2, "batch_size": hyper["batch_size"], "learning_rate_multiplier": 0.5, "beta": 0.1}}}
    assert job["peft"]["type"] == "lora" and api.dispatch.job_ids == [job["id"]]
    again = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=api.headers()).json()
    assert again["method"] == job["method"] and again["hyperparameters"] == hyper

    explicit = api.job_ok(training_file=preference, method=dpo(beta=0.25), validation_file=preference,
                          peft={"type": "full"})
    assert explicit["hyperparameters"]["beta"] == 0.25
    assert explicit["method"]["dpo"]["hyperparameters"]["beta"] == 0.25
    assert api.job_ok(training_file=preference, method=dpo(beta="auto"))["hyperparameters"]["beta"] == 0.1


@pytest.mark.parametrize("beta", [b"0", b"-1", b'"x"', b"NaN", b"1e999", b"10.5", b"true", b"[]"])
def test_a_bad_beta_is_a_400_naming_it(api, beta):
    preference = api.upload_ok(preference_file())
    # Raw JSON, as a client sends it: NaN and 1e999 (infinity) are what Python's parser accepts, not JSON.
    body = (b'{"model": "%s", "training_file": "%s", "method": {"type": "dpo", "dpo": {"hyperparameters": '
            b'{"beta": %s}}}}' % (BASE_MODEL.encode(), preference.encode(), beta))
    response = api.client.post("/v1/fine_tuning/jobs", content=body,
                               headers={**api.headers(), "content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "method.dpo.hyperparameters.beta" and error["code"] == "invalid_parameter"
    assert "beta" in error["message"]
    assert job_count(api) == 0


EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
         "operation": "eq"}


def test_a_reinforcement_job_resolves_its_hyperparameters_and_echoes_its_grader(any_db_api):
    api = any_db_api
    prompts = api.upload_ok(prompt_file(6))
    reinforcement = {"grader": EXACT, "hyperparameters": {"n_epochs": 2, "batch_size": 2, "compute_multiplier": 2,
                                                          "eval_interval": 5, "reasoning_effort": "low"}}
    job = api.job_ok(training_file=prompts, validation_file=prompts,
                     method={"type": "reinforcement", "reinforcement": reinforcement})
    hyper = job["hyperparameters"]
    assert (hyper["compute_multiplier"], hyper["eval_interval"], hyper["eval_samples"]) == (2.0, 5, 1)
    assert hyper["reasoning_effort"] == "low" and "beta" not in hyper
    assert hyper["learning_rate"] == pytest.approx(REINFORCEMENT_LEARNING_RATE_FACTOR["svfit"]
                                                   * DEFAULT_LEARNING_RATE["svfit"])
    assert job["method"] == {"type": "reinforcement", "reinforcement": {"grader": EXACT, "hyperparameters": {
        "n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 1.0, "compute_multiplier": 2.0,
        "eval_interval": 5, "eval_samples": 1, "reasoning_effort": "low"}}}
    assert api.dispatch.job_ids == [job["id"]]
    # "auto": 4 answers per prompt, an evaluation an epoch (3 steps of 2 prompts), one answer per prompt.
    auto = api.job_ok(training_file=prompts, method={"type": "reinforcement", "reinforcement": {
        "grader": EXACT, "hyperparameters": {"batch_size": 2}}})["hyperparameters"]
    assert (auto["compute_multiplier"], auto["eval_interval"], auto["eval_samples"]) == (1.0, 3, 1)
    assert auto["reasoning_effort"] == "default"
    # Each method's rate at multiplier 1 is its own multiple of its supervised default.
    lora = api.job_ok(training_file=prompts, peft={"type": "lora"},
                      method={"type": "reinforcement", "reinforcement": {"grader": EXACT}})["hyperparameters"]
    assert lora["learning_rate"] == pytest.approx(REINFORCEMENT_LEARNING_RATE_FACTOR["lora"]
                                                  * DEFAULT_LEARNING_RATE["lora"])


@pytest.mark.parametrize(("name", "value"), [
    ("compute_multiplier", 0), ("compute_multiplier", 0.25), ("compute_multiplier", 17), ("compute_multiplier", "x"),
    ("eval_interval", 0), ("eval_interval", 1.5), ("eval_samples", 0), ("eval_samples", 17),
    ("reasoning_effort", "extreme"),
])
def test_a_bad_reinforcement_hyperparameter_is_a_400_naming_it(api, name, value):
    prompts = api.upload_ok(prompt_file())
    response = api.create_job(training_file=prompts, method={"type": "reinforcement", "reinforcement": {
        "grader": EXACT, "hyperparameters": {name: value}}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (f"method.reinforcement.hyperparameters.{name}", "invalid_parameter")
    assert job_count(api) == 0


def test_an_answer_that_leaves_no_room_for_the_prompt_is_a_400(api):
    prompts = api.upload_ok(prompt_file())
    response = api.create_job(training_file=prompts, peft={"max_seq_length": 64, "max_completion_tokens": 64},
                              method={"type": "reinforcement", "reinforcement": {"grader": EXACT}})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "peft.max_completion_tokens" and job_count(api) == 0


def test_reinforcement_takes_prompts_and_prompts_take_reinforcement(api):
    prompts = api.upload_ok(prompt_file())
    refused = api.create_job(training_file=prompts).json()["error"]
    assert refused["param"] == "training_file" and "reinforcement" in refused["message"]
    chat = api.create_job(method={"type": "reinforcement", "reinforcement": {"grader": EXACT}}).json()["error"]
    assert chat["param"] == "training_file" and "needs prompts" in chat["message"]
    assert job_count(api) == 0


def judge(model: str) -> dict:
    return {"type": "score_model", "name": "judge", "model": model, "input": [{"role": "user", "content": "rate"}]}


@pytest.mark.parametrize("grader", [
    judge(BASE_MODEL),
    {"type": "multi", "name": "m", "calculate_output": "exact + judge",
     "graders": {"exact": EXACT, "judge": judge(BASE_MODEL)}},
])
def test_a_model_grader_may_grade_a_training_job_with_a_model_the_service_has(api, grader):
    prompts = api.upload_ok(prompt_file())
    response = api.create_job(training_file=prompts, method={"type": "reinforcement",
                                                             "reinforcement": {"grader": grader}})
    assert response.status_code == 200, response.text
    assert response.json()["method"]["reinforcement"]["grader"] == grader


def test_a_model_grader_may_name_a_base_only_a_serving_replica_has(api):
    from api.core.replicas import ReplicaState, beat

    prompts = api.upload_ok(prompt_file())
    method = {"type": "reinforcement", "reinforcement": {"grader": judge("judge-70b")}}
    assert api.create_job(training_file=prompts, method=method).status_code == 400  # nobody has it yet
    with api.session() as session:  # an operator's vLLM replica serving a model this service cannot fine-tune
        beat(session, ReplicaState(id="vllm-1", url="http://127.0.0.1:9", engine="vllm",
                                   servable_bases=("judge-70b",)), ttl_s=60)
    response = api.create_job(training_file=prompts, method=method)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("grader", "param"), [
    (judge("no-such-model"), "method.reinforcement.grader.model"),
    ({"type": "multi", "name": "m", "calculate_output": "exact + judge",
      "graders": {"exact": EXACT, "judge": judge("ft:tiny-llama:org-x::ftjob-nothere")}},
     "method.reinforcement.grader.graders.judge.model"),
])
def test_a_model_grader_naming_an_unknown_model_is_400_naming_its_model_field(api, grader, param):
    prompts = api.upload_ok(prompt_file())
    response = api.create_job(training_file=prompts, method={"type": "reinforcement",
                                                             "reinforcement": {"grader": grader}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, "model_not_found") and job_count(api) == 0


@pytest.mark.parametrize(("reinforcement", "param", "code"), [
    ({}, "method.reinforcement.grader", "missing_parameter"),
    ({"grader": None}, "method.reinforcement.grader", "missing_parameter"),
    ({"grader": "exact"}, "method.reinforcement.grader", "invalid_parameter"),
    ({"grader": {"type": "python", "name": "p", "source": "def grade(s, i): return 1"}},
     "method.reinforcement.grader.type", "grader_not_supported"),
    ({"grader": {**EXACT, "operation": "equals"}}, "method.reinforcement.grader.operation", "invalid_grader"),
    ({"grader": {"type": "multi", "name": "m", "graders": {"exact": {**EXACT, "input": "{{sample.nope}}"}},
                 "calculate_output": "exact"}}, "method.reinforcement.grader.graders.exact.input", "invalid_template"),
    ({"grader": {"type": "multi", "name": "m", "graders": {"exact": EXACT}, "calculate_output": "exact +"}},
     "method.reinforcement.grader.calculate_output", "invalid_formula"),
])
def test_a_reinforcement_jobs_grader_is_checked_first(api, reinforcement, param, code):
    response = api.create_job(method={"type": "reinforcement", "reinforcement": reinforcement})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert job_count(api) == 0 and not api.dispatch.job_ids


def test_a_reinforcement_block_beside_another_method_changes_nothing(api):
    """Only `method.type` picks the method: a supervised job with a stray reinforcement block is the job it was."""
    plain = api.job_ok(method={"type": "supervised"}, suffix="plain")
    stray = api.job_ok(method={"type": "supervised", "reinforcement": {"grader": {"type": "python"}}}, suffix="stray")
    assert stray["method"] == plain["method"] and stray["hyperparameters"] == plain["hyperparameters"]


def test_the_file_must_fit_the_method(api):
    chat, preference = api.upload_ok(chat_file()), api.upload_ok(preference_file())

    refused = api.create_job(training_file=chat, method=dpo(beta=0.2))
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["param"], error["code"]) == ("training_file", "invalid_training_file")
    assert "DPO" in error["message"] and "preference" in error["message"] and chat in error["message"]

    refused = api.create_job(training_file=preference, validation_file=chat, method=dpo())
    error = refused.json()["error"]
    assert (error["param"], error["code"]) == ("validation_file", "invalid_training_file")
    assert "preference" in error["message"]

    for method in (None, {"type": "supervised"}):
        refused = api.create_job(training_file=preference, **({"method": method} if method else {}))
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("training_file", "invalid_training_file")
        assert 'method.type = "dpo"' in error["message"]
    assert job_count(api) == 0


def test_legacy_hyperparameters_with_a_dpo_method_follow_the_supervised_rule(api):
    preference = api.upload_ok(preference_file())
    job = api.job_ok(training_file=preference, hyperparameters={"n_epochs": 3, "batch_size": 2},
                     method=dpo(n_epochs=3, beta=0.5))
    assert (job["hyperparameters"]["n_epochs"], job["hyperparameters"]["batch_size"]) == (3, 2)
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.5
    error = api.create_job(training_file=preference, hyperparameters={"n_epochs": 3},
                           method=dpo(n_epochs=4)).json()["error"]
    assert error["param"] == "hyperparameters.n_epochs" and "method.dpo" in error["message"]
    # A bad value in the method block is named there.
    error = api.create_job(training_file=preference, method=dpo(batch_size=0)).json()["error"]
    assert error["param"] == "method.dpo.hyperparameters.batch_size"


def test_another_orgs_file_is_unknown_training_file(any_db_api):
    api = any_db_api
    beta_file = api.upload_ok(org="beta")
    response = api.create_job(training_file=beta_file)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "training_file"
    assert beta_file in response.json()["error"]["message"]


def test_idempotency_key_returns_the_same_job(any_db_api):
    api = any_db_api
    training_file = api.upload_ok()
    first = api.create_job(training_file=training_file, headers={"Idempotency-Key": "k-1"}).json()
    again = api.create_job(training_file=training_file, headers={"Idempotency-Key": "k-1"}).json()
    assert again["id"] == first["id"] and api.dispatch.job_ids == [first["id"]]
    other_body = api.create_job(training_file=training_file, suffix="x", headers={"Idempotency-Key": "k-1"})
    assert other_body.status_code == 400 and other_body.json()["error"]["code"] == "idempotency_key_reused"
    # With a new key the same body is a new job: the key, not the body, decides.
    fresh = api.create_job(training_file=training_file, headers={"Idempotency-Key": "k-2"}).json()
    assert fresh["id"] != first["id"]


def test_identical_retried_body_returns_the_existing_job(any_db_api):
    api = any_db_api
    training_file = api.upload_ok()
    first = api.job_ok(training_file=training_file, seed=1)
    retried = api.job_ok(training_file=training_file, seed=1)
    assert retried["id"] == first["id"] and len(api.dispatch.job_ids) == 1
    assert api.job_ok(training_file=training_file, seed=2)["id"] != first["id"]
    # Another organization sending the same body gets its own job (and its own file check).
    assert api.create_job(org="beta", training_file=training_file).status_code == 400


def test_a_cancelled_job_is_not_handed_back_for_an_identical_body(api):
    training_file = api.upload_ok()
    first = api.job_ok(training_file=training_file)
    api.client.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel", headers=api.headers())
    assert api.job_ok(training_file=training_file)["id"] != first["id"]


def test_unavailable_queue_withdraws_the_job(api):
    api.dispatch.fail = True
    training_file = api.upload_ok()
    response = api.create_job(training_file=training_file)
    assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"
    assert job_count(api) == 0
    api.dispatch.fail = False
    assert api.job_ok(training_file=training_file)["status"] == "queued"


def test_list_newest_first_with_cursor_and_queue_positions(any_db_api):
    api = any_db_api
    training_file = api.upload_ok()
    ids = [api.job_ok(training_file=training_file, seed=i)["id"] for i in range(3)]
    set_job(api, ids[0], status="running")
    page = api.client.get("/v1/fine_tuning/jobs", params={"limit": 2}, headers=api.headers()).json()
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]] and page["has_more"] is True
    assert [j["queue_position"] for j in page["data"]] == [2, 1]
    rest = api.client.get("/v1/fine_tuning/jobs", params={"after": page["last_id"]}, headers=api.headers()).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False
    assert rest["data"][0]["queue_position"] is None


def test_list_filters_by_metadata_as_openai_does(any_db_api):
    api = any_db_api
    training_file = api.upload_ok()
    nlp = api.job_ok(training_file=training_file, seed=1, metadata={"team": "nlp", "run": "a b&c"})["id"]
    vision = api.job_ok(training_file=training_file, seed=2, metadata={"team": "vision"})["id"]
    empty = api.job_ok(training_file=training_file, seed=3, metadata={})["id"]
    none = api.job_ok(training_file=training_file, seed=4)["id"]
    blank = api.job_ok(training_file=training_file, seed=5, metadata={"team": ""})["id"]

    def listed(query) -> list[str]:
        response = api.client.get("/v1/fine_tuning/jobs", params=query, headers=api.headers())
        assert response.status_code == 200, response.text
        return [job["id"] for job in response.json()["data"]]

    assert listed({"metadata[team]": "nlp"}) == [nlp]
    assert listed({"metadata[team]": "nlp", "metadata[run]": "a b&c"}) == [nlp]
    assert listed({"metadata[team]": "nlp", "metadata[run]": "other"}) == []
    assert listed({"metadata[team]": ""}) == [blank]
    assert listed({"metadata[missing]": "x"}) == []
    assert listed({"metadata": "null"}) == [none, empty]
    assert listed({}) == [blank, none, empty, vision, nlp]
    first = api.client.get("/v1/fine_tuning/jobs", params={"metadata": "null", "limit": 1}, headers=api.headers())
    assert first.json()["has_more"] is True
    assert listed({"metadata": "null", "after": first.json()["last_id"]}) == [empty]

    for bad in ({"metadata": "x"}, {"metadata": "null", "metadata[team]": "nlp"},
                {f"metadata[k{i}]": "v" for i in range(17)}):
        response = api.client.get("/v1/fine_tuning/jobs", params=bad, headers=api.headers())
        assert response.status_code == 400 and response.json()["error"]["param"] == "metadata", bad
    other_org = api.client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "nlp"}, headers=api.headers("beta"))
    assert other_org.json()["data"] == []


def _post(api, job_id: str, action: str):
    return api.client.post(f"/v1/fine_tuning/jobs/{job_id}/{action}", headers=api.headers())


def test_cancel_pause_resume_transitions(any_db_api):
    api = any_db_api
    training_file = api.upload_ok()

    queued = api.job_ok(training_file=training_file, seed=1)["id"]
    cancelled = _post(api, queued, "cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    again = _post(api, queued, "cancel")
    assert again.status_code == 400 and again.json()["error"]["code"] == "invalid_state"

    running = api.job_ok(training_file=training_file, seed=2)["id"]
    set_job(api, running, status="running")
    assert _post(api, running, "pause").json()["status"] == "running"
    with api.session() as session:
        assert session.get(Job, _pk(api, running)).requested_action == "pause"
    assert _post(api, running, "resume").json()["status"] == "running"  # withdraws the pause
    with api.session() as session:
        assert session.get(Job, _pk(api, running)).requested_action is None
    assert _post(api, running, "cancel").json()["status"] == "running"
    with api.session() as session:
        assert session.get(Job, _pk(api, running)).requested_action == "cancel"
    assert _post(api, running, "pause").status_code == 400  # a cancel is on its way

    paused = api.job_ok(training_file=training_file, seed=3)["id"]
    dispatched_before = len(api.dispatch.job_ids)
    assert _post(api, paused, "pause").json()["status"] == "paused"  # queued: parked at once
    assert _post(api, paused, "pause").json()["status"] == "paused"  # idempotent
    resumed = _post(api, paused, "resume").json()
    assert resumed["status"] == "queued" and resumed["queue_position"] is not None
    assert api.dispatch.job_ids[dispatched_before:] == [paused]

    for status in ("succeeded", "failed"):
        finished = api.job_ok(training_file=training_file, seed=10 + len(status))["id"]
        set_job(api, finished, status=status)
        for action in ("cancel", "pause", "resume"):
            response = _post(api, finished, action)
            assert response.status_code == 400, (status, action)
            assert response.json()["error"]["code"] == "invalid_state"


def _pk(api, job_id: str) -> int:
    with api.session() as session:
        return session.scalar(select(Job.pk).where(Job.id == job_id))


def test_paused_job_cancels_at_once_and_resume_failure_keeps_it_paused(api):
    job_id = api.job_ok()["id"]
    set_job(api, job_id, status="paused", last_checkpoint_step=5)
    api.dispatch.fail = True
    response = _post(api, job_id, "resume")
    assert response.status_code == 503
    assert api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=api.headers()).json()["status"] == "paused"
    assert _post(api, job_id, "cancel").json()["status"] == "cancelled"


def test_worker_written_fields_are_shaped_for_strict_clients(api):
    job_id = api.job_ok()["id"]
    set_job(
        api,
        job_id,
        status="failed",
        error={"message": "out of memory"},
        progress={"step": 3, "total_steps": 10, "epoch": 0.3, "seconds_remaining": 12.5, "extra": 1},
        fine_tuned_model="ft:tiny-base:org:x:abc",
    )
    job = api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=api.headers()).json()
    assert job["error"] == {"code": "internal_error", "message": "out of memory", "param": None}
    assert job["progress"] == {"step": 3, "total_steps": 10, "epoch": 0.3, "seconds_remaining": 12.5}
    assert job["fine_tuned_model"] is None  # only a succeeded job names its model
    set_job(api, job_id, status="succeeded", error=None, result_files=["file-results"])
    job = api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=api.headers()).json()
    assert job["fine_tuned_model"] == "ft:tiny-base:org:x:abc" and job["result_files"] == ["file-results"]
    assert job["error"] is None


# --- continuing a fine-tune -----------------------------------------------------------------------------


def _fine_tune(api, org: str = "alpha", **job) -> tuple[dict, str]:
    """A job of `org` and the fine-tuned model row its worker would have published."""
    from api.core.tables import FineTunedModel

    parent = api.job_ok(org=org, **job)
    model_id = f"ft:{BASE_MODEL}:{api.org_ids[org]}::{parent['id'][-12:]}"
    api.add(FineTunedModel(id=model_id, org_id=api.org_ids[org], parent=BASE_MODEL, job_id=parent["id"],
                           storage_key=f"jobs/{parent['id']}/final"))
    return parent, model_id


def test_a_job_may_continue_its_organizations_fine_tune_with_that_fine_tunes_method(any_db_api):
    api = any_db_api
    parent, model_id = _fine_tune(api, peft={"type": "lora", "rank": 4, "max_seq_length": 64})
    preference = api.upload_ok(preference_file())
    job = api.job_ok(model=model_id, training_file=preference, method=dpo(), peft={"checkpoint_every": 3})
    assert job["model"] == model_id and job["method"]["type"] == "dpo"
    # The parent's method and spec, the request's training options.
    assert job["peft"] == {**{k: v for k, v in parent["peft"].items() if k != "max_seq_length"},
                           "checkpoint_every": 3}
    assert api.dispatch.job_ids[-1] == job["id"]


@pytest.mark.parametrize(("peft", "param"), [({"type": "svfit"}, "peft.type"), ({"rank": 8}, "peft.rank")])
def test_continuing_a_fine_tune_with_another_method_or_spec_is_a_400(api, peft, param):
    _parent, model_id = _fine_tune(api, peft={"type": "lora", "rank": 4})
    response = api.create_job(model=model_id, peft=peft)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, "invalid_parameter") and "keeps its method" in error["message"]


def test_another_organizations_fine_tune_cannot_be_continued(api):
    _parent, model_id = _fine_tune(api, org="beta")
    before = job_count(api)
    response = api.create_job(model=model_id)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert job_count(api) == before
