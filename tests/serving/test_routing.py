"""The API's router and the replica registry: registration and heartbeat expiry, which replica a request
goes to, the shared token, no replica at all, and answers through the router equal to the replica's own."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import sessionmaker

from api.core.db import make_engine
from api.core.migrations import upgrade_to_head
from api.core.replicas import ReplicaState, beat, live_replicas, remove
from api.core.settings import Settings
from api.core.tables import ServingReplica as ServingReplicaTable
from api.main import create_app
from api.routing.pool import ReplicaPool, ReplicaView
from api.core.route_targets import RouteTarget
from serving.embedded import ReplicaThread
from tests.api.conftest import make_api, migrated_sqlite_template, sqlite_url  # noqa: F401 - fixtures
from tests.serving.conftest import LLAMA, make_settings


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


def test_a_replica_that_stops_beating_leaves_the_registry(sessions):
    with sessions() as session:
        beat(session, ReplicaState(id="a", url="http://a"), ttl_s=10)
        beat(session, ReplicaState(id="b", url="http://b", servable_bases=("x",)), ttl_s=10)
        assert [r.id for r in live_replicas(session, ttl_s=10)] == ["a", "b"]
        assert live_replicas(session, ttl_s=10)[1].servable_bases == ("x",)
        time.sleep(0.3)
        beat(session, ReplicaState(id="a", url="http://a"), ttl_s=10)
        assert [r.id for r in live_replicas(session, ttl_s=0.2)] == ["a"]  # b's beat is older than the TTL
        beat(session, ReplicaState(id="a", url="http://a"), ttl_s=0.2)  # and the next beat deletes its row
        assert [r.id for r in live_replicas(session, ttl_s=100)] == ["a"]
        remove(session, "a")
        assert live_replicas(session, ttl_s=100) == []


def view(replica_id: str, *, bases=(LLAMA,), loaded=(), adapters=(), in_flight=0) -> ReplicaView:
    v = ReplicaView(ReplicaState(id=replica_id, url=f"http://{replica_id}", servable_bases=bases, loaded_bases=loaded))
    v.bases.update(loaded)
    for name in adapters:
        v.adapters[name] = None
    v.in_flight = in_flight
    return v


def pool_of(*views: ReplicaView, max_batch: int = 32) -> ReplicaPool:
    pool = ReplicaPool(Settings(inference_max_batch=max_batch), sessions=None)
    pool.views = {v.state.id: v for v in views}
    return pool


BASE = RouteTarget(model_id=LLAMA, base_id=LLAMA)
TUNED = RouteTarget(model_id="ft:x", base_id=LLAMA, adapter_key="jobs/x/final")


def test_the_replica_holding_the_model_is_preferred_even_when_busier():
    pool = pool_of(view("cold"), view("warm", loaded=(LLAMA,), in_flight=5))
    assert pool.choose(BASE, set()).state.id == "warm"
    pool = pool_of(view("cold"), view("warm", adapters=("ft:x",), in_flight=5))
    assert pool.choose(TUNED, set()).state.id == "warm"
    # holding the base is not holding the adapter: then the least loaded
    pool = pool_of(view("idle"), view("busy", loaded=(LLAMA,), in_flight=5))
    assert pool.choose(TUNED, set()).state.id == "idle"


def test_among_equals_the_least_loaded_and_a_full_holder_spills_over():
    pool = pool_of(view("a", loaded=(LLAMA,), in_flight=3), view("b", loaded=(LLAMA,), in_flight=1))
    assert pool.choose(BASE, set()).state.id == "b"
    pool = pool_of(view("cold", in_flight=1), view("warm", loaded=(LLAMA,), in_flight=4), max_batch=4)
    assert pool.choose(BASE, set()).state.id == "cold"


def test_a_tried_or_failed_replica_is_not_chosen_again_and_none_left_is_503():
    a, b = view("a", loaded=(LLAMA,)), view("b")
    pool = pool_of(a, b)
    assert pool.choose(BASE, {"a"}).state.id == "b"
    pool.failed(b)
    with pytest.raises(Exception) as info:
        pool.choose(BASE, {"a"})
    assert info.value.code == "no_serving_replica" and info.value.status == 503
    assert info.value.headers["Retry-After"]


def test_no_replica_for_a_base_is_404_and_none_at_all_is_503():
    pool = pool_of(view("a", bases=("other",)))
    with pytest.raises(Exception) as info:
        pool.choose(BASE, set())
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")
    with pytest.raises(Exception) as info:
        pool.choose(TUNED, set())  # a fine-tune the organization owns: its base is just not served now
    assert (info.value.status, info.value.code) == (503, "no_serving_replica")
    with pytest.raises(Exception) as info:
        pool_of().choose(BASE, set())
    assert (info.value.status, info.value.code) == (503, "no_serving_replica")


def test_the_api_with_no_replica_answers_503_with_retry_after(make_api):
    api = make_api(require_auth=True)
    response = api.client.post("/v1/chat/completions", headers=api.headers(),
                               json={"model": "tiny-base", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_serving_replica"
    assert int(response.headers["retry-after"]) >= 1


def test_a_replica_refuses_requests_without_the_shared_token(served):
    url = served.replica.url
    body = {"model": LLAMA, "prompt": "the movie was", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": served.headers()["Authorization"]}):
        response = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"
    for path in ("/v1/models", "/replica"):
        assert httpx.get(f"{url}{path}").status_code == 401
    assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "y"}).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no secret
    good = {"Authorization": f"Bearer {served.settings.serving_token}"}
    assert httpx.post(f"{url}/v1/completions", json=body, headers=good).status_code == 200


def _without_ids(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("id", "created")}


def _events(text: str) -> list:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in text.split("\n\n") if line.startswith("data: ")]


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_greedy_answers_through_the_router_equal_the_replicas_own(served, path):
    """The same bytes, but for the per-answer id and timestamp, streamed and not, fine-tune and base."""
    direct = {"Authorization": f"Bearer {served.settings.serving_token}"}
    for model in (served.model_ids["sv1"], LLAMA):
        body = {"model": model, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": True
                if path == "/chat/completions" else 2}
        body.update({"messages": [{"role": "user", "content": "what is good ?"}]} if path == "/chat/completions"
                    else {"prompt": "the movie was"})
        routed = served.post(path, body)
        own = httpx.post(f"{served.replica.url}/v1{path}", json=body, headers=direct, timeout=30)
        assert routed.status_code == own.status_code == 200, routed.text
        assert _without_ids(routed.json()) == _without_ids(own.json())
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        routed = served.post(path, stream_body)
        own = httpx.post(f"{served.replica.url}/v1{path}", json=stream_body, headers=direct, timeout=30)
        assert routed.headers["content-type"].startswith("text/event-stream")
        routed_events, own_events = _events(routed.text), _events(own.text)
        assert len(routed_events) == len(own_events) > 3
        assert [_without_ids(e) if isinstance(e, dict) else e for e in routed_events] == \
            [_without_ids(e) if isinstance(e, dict) else e for e in own_events]


def test_replica_errors_come_back_unchanged(served):
    body = {"model": LLAMA, "prompt": "x", "temperature": 5}
    routed = served.post("/completions", body)
    own = httpx.post(f"{served.replica.url}/v1/completions", json=body,
                     headers={"Authorization": f"Bearer {served.settings.serving_token}"})
    assert routed.status_code == own.status_code == 400
    assert routed.json() == own.json() and routed.json()["error"]["param"] == "temperature"


def test_a_replica_whose_heartbeat_stops_gets_no_more_requests(tmp_path, zoo):
    settings = make_settings(tmp_path, zoo, require_auth=False, serving_heartbeat_s=0.2, serving_replica_ttl_s=1.0)
    app = create_app(settings, dispatch=lambda job_id: None, auto_migrate=True)
    with ReplicaThread(settings) as replica, TestClient(app) as client:
        body = {"model": LLAMA, "prompt": "the movie was", "max_tokens": 2}
        assert client.get("/readyz").json()["serving_replicas"] == 1
        assert client.post("/v1/completions", json=body).status_code == 200
        heartbeat = replica.app.state.heartbeat
        heartbeat._stop.set()  # the beats stop; the replica itself still answers
        heartbeat._thread.join()
        time.sleep(settings.serving_replica_ttl_s + 1.1)  # past the TTL and the router's re-read
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 503 and response.json()["error"]["code"] == "no_serving_replica"
        assert client.get("/readyz").json()["serving_replicas"] == 0
    app.state.engine.dispose()


def test_the_router_unloads_the_least_recently_used_adapter_beyond_a_replicas_limit():
    v = view("a")
    v.state = ReplicaState(id="a", url="http://a", servable_bases=(LLAMA,), max_adapters=2)
    pool = pool_of(v)
    assert pool.used_adapter(v, "x") == [] and pool.used_adapter(v, "y") == []
    assert pool.used_adapter(v, "x") == []  # x is now the most recent
    assert pool.used_adapter(v, "z") == ["y"]
    assert list(v.adapters) == ["x", "z"]


def test_an_external_engine_gets_the_lora_export_at_its_rank(served):
    """A replica registered as vLLM (max LoRA rank 4) is sent `load_lora_adapter` with a PEFT LoRA folder
    exported at rank 4: our replica stands in for vLLM here (same endpoints, and it loads a bare PEFT
    folder as vLLM does). Its greedy answer equals our engine's serving the SVFit adapter at r' = 4."""
    from api.core.replicas import beat as write_beat

    settings = served.settings
    stand_in = ReplicaThread(settings, register=False).start()
    at_rank = ReplicaThread(settings.model_copy(update={"inference_serving_rank": 4}), register=False).start()
    try:
        served.replica.app.state.heartbeat._stop.set()  # only the stand-in is routable for this test
        served.replica.app.state.heartbeat._thread.join()
        with served.app.state.sessionmaker() as session:
            session.execute(ServingReplicaTable.__table__.delete())
            session.commit()
            write_beat(session, ReplicaState(id="vllm-1", url=stand_in.url, engine="vllm", device="external",
                                             servable_bases=(LLAMA,), loaded_bases=(LLAMA,), max_adapters=8,
                                             max_lora_rank=4), ttl_s=60)
        served.app.state.forwarder.pool._read_at = 0.0
        model = served.model_ids["sv2"]  # SVFit r = 16 on every linear layer
        body = {"model": model, "prompt": "the movie was", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "logprobs": 0}
        routed = served.post("/completions", body)
        assert routed.status_code == 200, routed.text
        exports = list((settings.data_dir / "store" / "serving-exports").rglob("adapter_config.json"))
        assert len(exports) == 1 and json.loads(exports[0].read_text())["r"] == 4
        token = {"Authorization": f"Bearer {settings.serving_token}"}
        loaded = httpx.post(f"{at_rank.url}/v1/load_lora_adapter", headers=token, json={
            "lora_name": model, "lora_path": "jobs/ftjob-sv2/final", "base_model_name": LLAMA})
        assert loaded.status_code == 200, loaded.text
        own = httpx.post(f"{at_rank.url}/v1/completions", json=body, headers=token, timeout=30).json()
        assert routed.json()["choices"][0]["text"] == own["choices"][0]["text"]
        assert routed.json()["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
            own["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4)
    finally:
        stand_in.stop()
        at_rank.stop()
        served.replica.app.state.heartbeat.start()  # the module's other tests route to it again
