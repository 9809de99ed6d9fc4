"""Routed serving in production shape: `svfit api` and two `svfit serving` processes on Postgres + Redis.
A replica SIGKILLed mid-stream ends the client's stream with an error event within seconds, and the next
request is answered by the survivor; with every replica gone, requests get 503 `no_serving_replica`."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit.databases import fresh_postgres_database
from testkit.tiny_models import build_tiny
from tests.e2e.conftest import ROOT, SVFIT, Service, base_env
from tests.network import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]

LONG = "tiny-llama-long"
CONTEXT = 8192  # room for an answer that takes seconds to generate, so it can be cut in the middle


@pytest.fixture(scope="module")
def long_context_models(tmp_path_factory) -> Path:
    """The tiny chat Llama with a long context: a stream of thousands of tokens lasts long enough to kill its
    replica halfway."""
    root = tmp_path_factory.mktemp("long-models")
    folder = build_tiny("llama", "causal", root).rename(root / LONG)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        config = json.loads((folder / name).read_text())
        config[key] = CONTEXT
        (folder / name).write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def routed(tmp_path_factory, long_context_models) -> Iterator[Service]:
    port = free_port()
    data_dir = tmp_path_factory.mktemp("routed-data")
    with fresh_postgres_database("svfit_routed", migrate=False) as url:
        env = base_env(data_dir, long_context_models, port)
        env.update(SVFIT_DATABASE_URL=url, SVFIT_BROKER_URL=f"redis://127.0.0.1:6379/{secrets.randbelow(8) + 8}",
                   SVFIT_SERVING_TOKEN=secrets.token_urlsafe(16), SVFIT_REQUIRE_AUTH="false",
                   SVFIT_SERVING_REPLICA_TTL_S="3", SVFIT_INFERENCE_MAX_BATCH="64")
        service = Service(f"http://127.0.0.1:{port}", env, data_dir)
        subprocess.run([*SVFIT, "migrate"], cwd=ROOT, env=env, check=True, capture_output=True)
        service.start("api", "api", "--host", "127.0.0.1", "--port", str(port))
        try:
            service.replicas = {name: service.start_replica(name) for name in ("serving-1", "serving-2")}
            service.wait_ready()
            yield service
        finally:
            service.stop()


def replica_answering(service: Service) -> str:
    """The name of the replica with a request in flight (its own count, read through its operator endpoint)."""
    token = {"Authorization": f"Bearer {service.env['SVFIT_SERVING_TOKEN']}"}
    for _ in range(100):
        for name, url in service.replicas.items():
            if httpx.get(f"{url}/replica", headers=token, timeout=5).json()["in_flight"] > 0:
                return name
        time.sleep(0.02)
    raise AssertionError("no replica reports the request in flight")


def test_a_replica_killed_mid_stream_ends_the_stream_cleanly_and_the_survivor_answers(routed):
    body = {"model": LONG, "prompt": "the movie was", "max_tokens": CONTEXT - 16, "ignore_eos": True,
            "temperature": 0, "n": 4, "stream": True}
    events, killed_at, ended_at = [], None, None
    with httpx.stream("POST", f"{routed.base_url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 20:
                victim = replica_answering(routed)
                os.killpg(routed.processes[victim].pid, signal.SIGKILL)
                killed_at = time.monotonic()
        ended_at = time.monotonic()
    assert killed_at is not None, "the stream ended before the replica could be killed"
    assert ended_at - killed_at < 5.0
    assert events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["code"] == "serving_replica_failed" and error["type"] == "server_error"
    routed.processes[victim].wait()

    started = time.monotonic()
    answer = httpx.post(f"{routed.base_url}/v1/completions", timeout=30,
                        json={"model": LONG, "prompt": "the movie was", "max_tokens": 4, "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 4
    assert time.monotonic() - started < 5.0

    survivor = next(name for name in routed.replicas if name != victim)
    os.killpg(routed.processes[survivor].pid, signal.SIGTERM)  # a clean stop takes its registry row along
    routed.processes[survivor].wait(timeout=30)
    gone = httpx.post(f"{routed.base_url}/v1/completions", timeout=30,
                      json={"model": LONG, "prompt": "x", "max_tokens": 1})
    assert gone.status_code == 503 and gone.json()["error"]["code"] == "no_serving_replica"
    assert int(gone.headers["retry-after"]) >= 1
