"""`POST /v1/fine_tuning/alpha/graders/validate` and `/run` through the app: good graders answered in the shapes
the `openai` package reads, each kind of bad grader a 400 naming its field with the graders library's code,
the request around the grader, auth; model graders asking the organization's own hosted models through the
inference router (a tiny random Llama on an in-process replica), with ownership as inference has it; and the
pieces of api/services/graders.py that turn a grader's model call into a chat completion."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import anyio.to_thread
import pytest
from openai.types.fine_tuning.alpha import GraderRunResponse, GraderValidateResponse

from api.core.errors import ServingReplicaFailed
from api.core.route_targets import RouteTarget
from api.services import graders as graders_service
from graders import chat_calls
from tests.api.conftest import Api, _build_api
from tests.graders.builders import label_model, multi, python, score_model, string_check, text_similarity
from tests.hostile.served_models import LLAMA, build_models, publish_classifier

VALIDATE = "/v1/fine_tuning/alpha/graders/validate"
RUN = "/v1/fine_tuning/alpha/graders/run"
ERROR_FLAGS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
               "model_grader_refusal_error", "model_grader_server_error", "other_error", "python_grader_runtime_error",
               "python_grader_server_error", "sample_parse_error", "truncated_observation_error",
               "unresponsive_reward_error")


def post(api: Api, path: str, body: object, org: str | None = "alpha"):  # noqa: ANN201
    return api.client.post(path, json=body, headers=api.headers(org))


def raised_flags(answer: dict) -> set[str]:
    return {flag for flag in ERROR_FLAGS if answer["metadata"]["errors"][flag]}


def assert_error(response, status: int, param: str | None, code: str) -> dict:  # noqa: ANN001
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return error


# --- text graders -------------------------------------------------------------------------------------------

GOOD = {
    "string_check": string_check(),
    "text_similarity": text_similarity("fuzzy_match", pass_threshold=0.5),
    "multi": multi({"exact": string_check(), "close": text_similarity("bleu", pass_threshold=0.1)},
                   "0.5 * exact + 0.5 * close"),
    # The openai package's MultiGraderParam spells `graders` as one grader: a map of one, keyed by its name.
    "multi_single": multi(string_check(name="exact"), "exact"),
}


@pytest.mark.parametrize("name", GOOD)
def test_validate_answers_a_good_grader_as_sent(api: Api, name: str):
    response = post(api, VALIDATE, {"grader": GOOD[name]})
    assert response.status_code == 200, response.text
    assert response.json() == {"grader": GOOD[name]}
    if name != "multi":  # the openai types spell a multi grader's `graders` as one grader, not a map
        GraderValidateResponse.model_validate(response.json())


def test_run_grades_a_sample_for_an_item(api: Api):
    right = post(api, RUN, {"grader": string_check(), "model_sample": "Paris", "item": {"answer": "Paris"}}).json()
    wrong = post(api, RUN, {"grader": string_check(), "model_sample": "Lyon", "item": {"answer": "Paris"}}).json()
    assert (right["reward"], wrong["reward"]) == (1.0, 0.0)
    assert right["metadata"]["name"] == "exact" and right["metadata"]["type"] == "string_check"
    assert raised_flags(right) == set() and right["metadata"]["error_details"] == []
    assert right["sub_rewards"] == {} and right["model_grader_token_usage_per_model"] == {}
    parsed = GraderRunResponse.model_validate(right)
    assert parsed.reward == 1.0 and parsed.metadata.errors.api_model_grader_server_error is False


def test_run_a_multi_grader_reports_each_sub_reward(api: Api):
    grader = multi({"exact": string_check(), "loose": string_check("ilike")},
                   "0.25 * exact + 0.75 * loose")
    answer = post(api, RUN, {"grader": grader, "model_sample": "It is PARIS.", "item": {"answer": "paris"}}).json()
    assert answer["reward"] == pytest.approx(0.75)
    assert answer["sub_rewards"] == {"exact": 0.0, "loose": 1.0} == answer["metadata"]["scores"]
    GraderRunResponse.model_validate(answer)


def test_what_a_sample_does_is_a_flag_not_an_error(api: Api):
    """A missing item field is the sample's problem: 200, reward 0, the flag and which grader failed."""
    answer = post(api, RUN, {"grader": multi({"exact": string_check()}, "exact"), "model_sample": "x"}).json()
    assert answer["reward"] == 0.0 and raised_flags(answer) == {"invalid_variable_error"}
    assert [d["grader"] for d in answer["metadata"]["error_details"]] == ["grader.graders.exact"]


# (case, grader, param, code): one of each way a grader is refused, at the top and nested in a multi.
BAD_GRADERS = [
    ("python", python(), "grader.type", "grader_not_supported"),
    ("python_in_multi", multi({"code": python()}, "code"), "grader.graders.code.type", "grader_not_supported"),
    ("type_missing", {"name": "x"}, "grader.type", "invalid_grader"),
    ("type_unknown", {**string_check(), "type": "regex"}, "grader.type", "invalid_grader"),
    ("field_missing", {k: v for k, v in string_check().items() if k != "reference"}, "grader.reference",
     "invalid_grader"),
    ("field_unknown", {**string_check(), "weight": 2}, "grader.weight", "invalid_grader"),
    ("operation_unknown", string_check("equals"), "grader.operation", "invalid_grader"),
    ("metric_unknown", text_similarity("meteor_plus"), "grader.evaluation_metric", "invalid_grader"),
    ("template_namespace", string_check(input="{{answer.text}}"), "grader.input", "invalid_template"),
    ("template_in_multi", multi({"exact": string_check(reference="{{item.}}")}, "exact"),
     "grader.graders.exact.reference", "invalid_template"),
    ("formula_syntax", multi({"exact": string_check()}, "exact +"), "grader.calculate_output", "invalid_formula"),
    ("formula_unknown_name", multi({"exact": string_check()}, "exact + other"), "grader.calculate_output",
     "invalid_formula"),
    ("multi_key", multi({"not an identifier": string_check()}, "1"), "grader.graders", "invalid_grader"),
    ("score_model_image", score_model(content=[{"type": "input_image", "image_url": "http://x"}]),
     "grader.input[0].content[0].type", "grader_not_supported"),
    ("score_model_range", score_model(range=[1, 0]), "grader.range", "invalid_grader"),
    ("label_model_passing", label_model(passing=("maybe",)), "grader.passing_labels[0]", "invalid_grader"),
    ("too_many_graders", multi({f"g{i}": string_check() for i in range(17)}, "g0"), "grader.graders",
     "grader_too_large"),
]


@pytest.mark.parametrize("path", [VALIDATE, RUN])
@pytest.mark.parametrize(("grader", "param", "code"), [c[1:] for c in BAD_GRADERS], ids=[c[0] for c in BAD_GRADERS])
def test_a_bad_grader_is_400_naming_its_field(api: Api, path: str, grader: dict, param: str, code: str):
    assert_error(post(api, path, {"grader": grader, "model_sample": "x"}), 400, param, code)


@pytest.mark.parametrize(("path", "body", "param", "code"), [
    (VALIDATE, {}, "grader", "missing_parameter"),
    (VALIDATE, {"grader": "exact"}, "grader", "invalid_parameter"),
    (VALIDATE, [string_check()], None, "invalid_parameter"),
    (RUN, {"grader": string_check()}, "model_sample", "missing_parameter"),
    (RUN, {"grader": string_check(), "model_sample": 4}, "model_sample", "invalid_parameter"),
    (RUN, {"grader": string_check(), "model_sample": None}, "model_sample", "invalid_parameter"),
    (RUN, {"model_sample": "x"}, "grader", "missing_parameter"),
])
def test_the_request_around_the_grader_is_checked(api: Api, path: str, body: object, param: str | None, code: str):
    assert_error(post(api, path, body), 400, param, code)


def test_a_sample_over_the_librarys_limit_is_refused(api: Api):
    from graders.limits import MAX_SAMPLE_CHARS

    body = {"grader": string_check(), "model_sample": "x" * (MAX_SAMPLE_CHARS + 1)}
    assert_error(post(api, RUN, body), 400, "model_sample", "invalid_parameter")


def test_the_endpoints_take_a_key_like_every_other(make_api):
    api = make_api(require_auth=True)
    for path in (VALIDATE, RUN):
        body = {"grader": string_check(), "model_sample": "a", "item": {"answer": "a"}}
        assert_error(post(api, path, body, org=None), 401, None, "invalid_api_key")
        bad = api.client.post(path, json=body, headers={"Authorization": "Bearer sk-svfit-nope"})
        assert_error(bad, 401, None, "invalid_api_key")
        assert post(api, path, body).status_code == 200


def test_a_model_grader_with_no_replica_running_is_503_as_inference_is(api: Api):
    for path in (VALIDATE, RUN):
        response = post(api, path, {"grader": score_model(model=LLAMA), "model_sample": "x"})
        assert_error(response, 503, None, "no_serving_replica")
        assert "retry-after" in response.headers


# --- model graders on a served tiny model ------------------------------------------------------------------


@dataclass
class Served:
    api: Api
    classifier: str  # beta's classification fine-tune (it cannot chat)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite_template) -> Iterator[Served]:  # noqa: ANN001
    root = tmp_path_factory.mktemp("graders-served")
    models = build_models(root)
    shutil.copyfile(migrated_sqlite_template, root / "svfit.db")
    api = _build_api(root, f"sqlite:///{root / 'svfit.db'}", models_dir=models, inference_batch_window_ms=0,
                     serving=True)
    with api.client:
        yield Served(api, publish_classifier(api.app, api.org_ids["beta"], models))
    api.close()


JUDGE = score_model(model=LLAMA, sampling_params={"max_completions_tokens": 8, "temperature": 0, "seed": 1})


def test_a_score_model_grader_asks_the_hosted_model(served: Served):
    answer = post(served.api, RUN, {"grader": JUDGE, "model_sample": "4", "item": {"answer": "4"}}).json()
    GraderRunResponse.model_validate(answer)
    # A random tiny model says anything: a number found in it (clamped into the range) or a parse error.
    flags = raised_flags(answer)
    assert flags <= {"model_grader_parse_error"}, answer["metadata"]["errors"]
    assert 0.0 <= answer["reward"] <= 1.0 and (answer["reward"] == 0.0 or not flags)
    assert answer["metadata"]["sampled_model_name"] == LLAMA
    usage = answer["model_grader_token_usage_per_model"][LLAMA]
    assert 1 <= usage["completion_tokens"] <= 8 and usage["total_tokens"] == answer["metadata"]["token_usage"]


def test_a_label_model_inside_a_multi_grader_asks_the_hosted_model(served: Served):
    grader = multi({"label": label_model(model=LLAMA), "exact": string_check()}, "label + exact")
    answer = post(served.api, RUN, {"grader": grader, "model_sample": "4", "item": {"answer": "4"}}).json()
    GraderRunResponse.model_validate(answer)
    assert raised_flags(answer) <= {"model_grader_parse_error"}, answer["metadata"]["errors"]
    if raised_flags(answer):
        assert [d["grader"] for d in answer["metadata"]["error_details"]] == ["grader.graders.label"]
    assert answer["metadata"]["sampled_model_name"] == LLAMA


@pytest.mark.parametrize("path", [VALIDATE, RUN])
@pytest.mark.parametrize(("grader", "param"), [
    (score_model(model="no-such-model"), "grader.model"),
    (multi({"judge": score_model(model="ft:tiny-llama:org:x:ftjob-nothere")}, "judge"), "grader.graders.judge.model"),
    (multi({"inner": multi({"labels": label_model(model="nope")}, "labels")}, "inner"),
     "grader.graders.inner.graders.labels.model"),
])
def test_an_unknown_model_is_400_naming_the_graders_model_field(served: Served, path: str, grader: dict, param: str):
    error = assert_error(post(served.api, path, {"grader": grader, "model_sample": "x"}), 400, param, "model_not_found")
    assert "does not exist or you do not have access to it" in error["message"]


@pytest.mark.parametrize("path", [VALIDATE, RUN])
def test_another_organizations_model_is_as_if_it_did_not_exist(served: Served, path: str):
    ghost = served.classifier.rsplit(":", 1)[0] + ":ftjob-nothere"
    theirs = post(served.api, path, {"grader": score_model(model=served.classifier), "model_sample": "x"})
    never = post(served.api, path, {"grader": score_model(model=ghost), "model_sample": "x"})
    mine = assert_error(theirs, 400, "grader.model", "model_not_found")
    assert mine["message"].replace(served.classifier, "<id>") == never.json()["error"]["message"].replace(ghost, "<id>")


def test_the_owner_reaches_its_own_fine_tune(served: Served):
    body = {"grader": score_model(model=served.classifier), "model_sample": "x", "item": {"answer": "y"}}
    assert post(served.api, VALIDATE, body, org="beta").status_code == 200
    answer = post(served.api, RUN, body, org="beta").json()
    # A classifier cannot chat: the replica refuses, and the run reports it as the model grader's failure.
    assert answer["reward"] == 0.0 and raised_flags(answer) == {"model_grader_server_error"}
    assert "model_not_generative" in answer["metadata"]["errors"]["model_grader_server_error_details"]


# --- the service's pieces ------------------------------------------------------------------------------------


def test_model_fields_lists_every_model_grader_by_path():
    grader = multi({"judge": score_model(model="a"), "inner": multi({"labels": label_model(model="b")}, "labels"),
                    "exact": string_check()}, "judge + inner + exact")
    compiled = graders_service.compile_checked(grader)
    assert compiled.model_fields() == {"grader.graders.judge.model": "a",
                                       "grader.graders.inner.graders.labels.model": "b"}
    assert graders_service.compile_checked(string_check()).model_fields() == {}


def test_a_graders_sampling_params_become_chat_completion_options():
    sampling = {"max_completions_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 7, "reasoning_effort": "high"}
    body = json.loads(chat_calls.chat_body("m", [{"role": "user", "content": "hi"}], sampling))
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5,
                    "temperature": 0.5, "top_p": 0.9, "seed": 7}


def chat_completion(content: str | None, refusal: str | None = None, usage: dict | None = None) -> bytes:
    return json.dumps({"object": "chat.completion", "usage": usage, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content, "refusal": refusal}}]}).encode()


def test_a_chat_completion_becomes_the_graders_answer():
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
             "prompt_tokens_details": {"cached_tokens": 1}}
    answer = chat_calls.model_answer(200, chat_completion("0.7", usage=usage))
    assert (answer.text, answer.refusal, answer.usage["cached_tokens"]) == ("0.7", None, 1)
    assert chat_calls.model_answer(200, chat_completion(None, refusal="no")).refusal == "no"
    envelope = {"error": {"message": "too long", "type": "invalid_request_error", "param": "messages",
                          "code": "context_length_exceeded"}}
    with pytest.raises(chat_calls.HostedModelError, match="400 context_length_exceeded: too long"):
        chat_calls.model_answer(400, json.dumps(envelope).encode())
    with pytest.raises(chat_calls.HostedModelError, match="502"):
        chat_calls.model_answer(502, b"<html>bad gateway</html>")
    with pytest.raises(chat_calls.HostedModelError, match="not a chat completion"):
        chat_calls.model_answer(200, b'{"choices": []}')


class FakeForwarder:
    """Answers `ask` as told, on the event loop, remembering what it was asked."""

    def __init__(self, answer: tuple[int, bytes] | BaseException) -> None:
        self.answer = answer
        self.asked: list[tuple[str, dict, RouteTarget]] = []

    async def ask(self, path: str, body: bytes, target: RouteTarget) -> tuple[int, bytes]:
        self.asked.append((path, json.loads(body), target))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def complete_in_a_thread(forwarder: FakeForwarder, model: str = "m"):  # noqa: ANN201
    """What the run route does: `complete` called on a worker thread, the call itself made on the loop."""
    models = graders_service.HostedModels(forwarder, {model: RouteTarget(model, model)})  # type: ignore[arg-type]

    async def main():  # noqa: ANN202
        return await anyio.to_thread.run_sync(models.complete, model, [{"role": "user", "content": "x"}], {"seed": 1})

    return anyio.run(main)


def test_complete_goes_to_the_router_from_the_grading_thread():
    forwarder = FakeForwarder((200, chat_completion("1")))
    assert complete_in_a_thread(forwarder).text == "1"
    assert forwarder.asked == [("chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                      "seed": 1}, RouteTarget("m", "m"))]


def test_a_replica_gone_silent_is_a_timeout_and_a_failed_one_a_server_error():
    silent = ServingReplicaFailed("stopped")
    silent.__cause__ = asyncio.TimeoutError()
    with pytest.raises(TimeoutError):
        complete_in_a_thread(FakeForwarder(silent))
    with pytest.raises(ServingReplicaFailed):
        complete_in_a_thread(FakeForwarder(ServingReplicaFailed("stopped")))
