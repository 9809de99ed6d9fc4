"""A reinforcement job's model graders, asked from the worker: each call goes to a serving replica of the
registry with the serving token, a fine-tune is loaded onto the replica first (and again after the replica
forgets it), an unreachable replica is passed over for the next, and a step no replica could grade stops the
job with `grader_model_unavailable` naming the grader.

The replica here is a small HTTP server speaking the replica protocol (chat completions and vLLM's
load_lora_adapter) with answers the test chooses, so rewards can be checked against known scores; the
embedded journey in tests/e2e asks a real replica."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.worker.conftest import BASE_MODEL

SERVING_TOKEN = "replica-secret"
ORG = "org-test"


def score_model(model: str, name: str = "judge") -> dict:
    return {"type": "score_model", "name": name, "model": model, "range": [0, 1],
            "input": [{"role": "user", "content": "Score '{{sample.output_text}}' against {{item.answer}}."}],
            "sampling_params": {"max_completions_tokens": 4, "temperature": 0}}


def reinforcement(grader: dict) -> dict:
    return {"type": "reinforcement", "reinforcement": {"grader": grader}}


class FakeReplica:
    """A replica on a loopback port: answers chat completions with `score` for the bases and the adapters it
    holds (404 for an adapter it does not), loads adapters, and records every request."""

    def __init__(self, score: str = '{"result": 0.75}') -> None:
        self.score = score
        self.adapters: set[str] = set()
        self.requests: list[tuple[str, dict, str | None]] = []
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                replica.requests.append((self.path, body, self.headers.get("Authorization")))
                status, answer = replica.answer(self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        if path == "/v1/load_lora_adapter":
            self.adapters.add(body["lora_name"])
            return 200, {}
        model = body["model"]
        if model.startswith("ft:") and model not in self.adapters:
            return 404, {"error": {"message": "not loaded", "type": "invalid_request_error", "param": "model",
                                   "code": "model_not_found"}}
        usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
        return 200, {"object": "chat.completion", "model": model, "usage": usage,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": self.score}}]}

    def calls(self, path: str = "/v1/chat/completions") -> list[dict]:
        return [body for p, body, _ in self.requests if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def register(service, replica_id: str, url: str, **fields: object) -> None:  # noqa: ANN001
    from api.core.replicas import ReplicaState, beat

    with service.session() as session:
        beat(session, ReplicaState(id=replica_id, url=url, servable_bases=(BASE_MODEL,), **fields), ttl_s=60)


@pytest.fixture
def replica(service, monkeypatch) -> Iterator[FakeReplica]:  # noqa: ANN001
    from tests.worker.conftest import clear_caches

    monkeypatch.setenv("SVFIT_SERVING_TOKEN", SERVING_TOKEN)
    clear_caches()
    fake = FakeReplica()
    register(service, "replica-a", fake.url)
    yield fake
    fake.close()


def reward_for(service, grader: dict, **models_options: object):  # noqa: ANN001, ANN201
    from api.core.storage import get_storage
    from graders import compile_grader
    from worker.grader_models import GraderModels, grader_targets
    from worker.rewards import GRADER_PATH, GraderReward

    fields = compile_grader(grader, GRADER_PATH).model_fields()
    models = GraderModels(service.settings, get_storage(), grader_targets(ORG, fields), **models_options)
    return GraderReward(grader, models)


def test_a_score_model_reward_is_the_hosted_models_score(service, replica):
    from api.core.storage import get_storage
    from worker.rewards import job_reward

    reward = job_reward(reinforcement(score_model(BASE_MODEL)), org_id=ORG, settings=service.settings,
                        storage=get_storage())
    try:
        assert list(reward([{"answer": "4"}, {"answer": "5"}], ["four", "six"])) == [0.75, 0.75]
    finally:
        reward.close()
    calls = replica.calls()
    assert [c["model"] for c in calls] == [BASE_MODEL, BASE_MODEL]
    assert {c["messages"][0]["content"] for c in calls} == {"Score 'four' against 4.", "Score 'six' against 5."}
    assert all(c["max_completion_tokens"] == 4 and c["temperature"] == 0 for c in calls)
    assert {auth for _, _, auth in replica.requests} == {f"Bearer {SERVING_TOKEN}"}
    assert reward.summary() is None
    assert reward.usage() == f"Model graders used 26 tokens grading 2 answers ({BASE_MODEL} 26)."


def test_a_multi_grader_combines_the_model_score_with_a_text_check(service, replica):
    exact = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "operation": "eq"}
    grader = {"type": "multi", "name": "m", "graders": {"judge": score_model(BASE_MODEL), "exact": exact},
              "calculate_output": "0.5 * judge + 0.5 * exact"}
    reward = reward_for(service, grader)
    assert list(reward([{"answer": "4"}, {"answer": "4"}], ["4", "5"])) == [0.875, 0.375]


def test_a_fine_tune_is_loaded_onto_the_replica_first_and_again_when_it_forgets(service, replica):
    from api.core.tables import FineTunedModel

    job_id = service.add_job(validation=False)
    model = f"ft:{BASE_MODEL}:{ORG}::{job_id}"
    with service.session() as session:
        session.add(FineTunedModel(id=model, org_id=ORG, parent=BASE_MODEL, job_id=job_id,
                                   storage_key=f"jobs/{job_id}/final"))
    reward = reward_for(service, score_model(model))
    assert list(reward([{"answer": "4"}], ["4"])) == [0.75]
    [load] = replica.calls("/v1/load_lora_adapter")
    assert load == {"lora_name": model, "lora_path": f"jobs/{job_id}/final", "base_model_name": BASE_MODEL}

    replica.adapters.clear()  # it restarted: the next call is a 404, then a load and the call again
    assert list(reward([{"answer": "4"}], ["4"])) == [0.75]
    assert len(replica.calls("/v1/load_lora_adapter")) == 2
    assert [p for p, _, _ in replica.requests][-3:] == ["/v1/chat/completions", "/v1/load_lora_adapter",
                                                         "/v1/chat/completions"]


def test_an_unreachable_replica_is_passed_over_for_the_next(service, replica):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    register(service, "replica-dead", dead_url, loaded_bases=(BASE_MODEL,))  # the dead one "holds" the base
    reward = reward_for(service, score_model(BASE_MODEL))
    assert list(reward([{"answer": "4"}] * 3, ["a", "b", "c"])) == [0.75] * 3
    assert len(replica.calls()) == 3 and reward.failed == 0


def test_a_step_no_replica_could_grade_stops_the_job_naming_the_grader(service, replica):
    from api.core.errors import GraderModelUnavailable

    grader = {"type": "multi", "name": "m", "graders": {"judge": score_model("other-base")},
              "calculate_output": "judge"}
    reward = reward_for(service, grader, patience_s=0)
    with pytest.raises(GraderModelUnavailable) as info:
        reward([{"answer": "4"}, {"answer": "5"}], ["4", "5"])
    assert info.value.code == "grader_model_unavailable"
    assert info.value.param == "method.reinforcement.grader.graders.judge"
    assert "No running serving replica serves the base model 'other-base'" in info.value.message


def test_an_answer_without_a_score_is_that_samples_failure_not_the_jobs(service, replica):
    replica.score = "no idea"
    reward = reward_for(service, score_model(BASE_MODEL))
    assert list(reward([{"answer": "4"}], ["4"])) == [0.0]
    assert reward.failed == 1 and reward.summary().startswith("1 of 1 sampled answers could not be graded")


def test_a_fine_tune_deleted_since_the_job_was_made_is_model_not_found_naming_its_field(service):
    from api.core.errors import ModelNotFound
    from worker.grader_models import grader_targets

    with pytest.raises(ModelNotFound) as info:
        grader_targets(ORG, {"method.reinforcement.grader.model": f"ft:{BASE_MODEL}:{ORG}::ftjob-gone"})
    assert info.value.param == "method.reinforcement.grader.model"
