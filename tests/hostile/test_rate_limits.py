"""Per-key rate limits on uploads, job creation and inference: a 429 in the envelope (`rate_limit_exceeded`,
type `rate_limit_error`) with Retry-After, that stores and enqueues nothing; buckets per key, refilling
with time; and the Redis store shared by API processes (and failing open when Redis is gone).
"""

from __future__ import annotations

import uuid

import pytest

from api.core.rate_limit import MemoryRateLimiter, RedisRateLimiter
from api.services.keys import create_api_key
from tests.api.conftest import chat_file
from tests.hostile.conftest import assert_envelope, row_counts, store_entries

REDIS_URL = "redis://127.0.0.1:6379/0"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def assert_rate_limited(response) -> None:  # noqa: ANN001
    error = assert_envelope(response, 429, "rate_limit_exceeded", None)
    assert error["type"] == "rate_limit_error"
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert int(response.headers["retry-after-ms"]) <= retry_after * 1000


def test_uploads_over_the_limit_are_429_and_store_nothing(make_api):
    api = make_api(rate_limit_uploads_per_minute=2)
    for _ in range(2):
        api.upload_ok()
    stored, rows = store_entries(api), row_counts(api)
    assert_rate_limited(api.upload(chat_file()))
    assert store_entries(api) == stored and row_counts(api) == rows
    # Another organization's key has its own bucket.
    assert api.upload(chat_file(), org="beta").status_code == 200


def test_job_creation_over_the_limit_is_429_and_enqueues_nothing(make_api):
    api = make_api(rate_limit_jobs_per_minute=1)
    file_id = api.upload_ok()
    api.job_ok(training_file=file_id)
    response = api.create_job(training_file=file_id, suffix="again")
    assert_rate_limited(response)
    assert len(api.dispatch.job_ids) == 1 and row_counts(api)["jobs"] == 1


def test_inference_over_the_limit_is_429_before_any_model_work(make_api):
    """The 429 comes before the model is resolved: even a request for a model that does not exist counts."""
    api = make_api(rate_limit_inference_per_minute=3, serving=True)
    bodies = [
        ("/v1/completions", {"model": "no-such-model", "prompt": "x"}),
        ("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/classifications", {"model": "no-such-model", "input": "x"}),
    ]
    for path, body in bodies:  # the three endpoints share one bucket
        assert api.client.post(path, json=body, headers=api.headers()).status_code == 404
    for path, body in bodies:
        assert_rate_limited(api.client.post(path, json=body, headers=api.headers()))


def test_graders_take_from_the_inference_bucket(make_api):
    """A grader run may ask models: the graders endpoints share inference's bucket, and a 429 comes before the
    grader is even read."""
    api = make_api(rate_limit_inference_per_minute=2)
    grader = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "a",
              "operation": "eq"}
    assert api.client.post("/v1/fine_tuning/alpha/graders/validate", json={"grader": grader},
                           headers=api.headers()).status_code == 200
    assert api.client.post("/v1/fine_tuning/alpha/graders/run", json={"grader": grader, "model_sample": "a"},
                           headers=api.headers()).status_code == 200
    for path in ("/v1/fine_tuning/alpha/graders/validate", "/v1/fine_tuning/alpha/graders/run"):
        assert_rate_limited(api.client.post(path, json={"grader": {"type": "python"}}, headers=api.headers()))
    assert_rate_limited(api.client.post("/v1/completions", json={"model": "m", "prompt": "x"}, headers=api.headers()))
    assert api.client.post("/v1/fine_tuning/alpha/graders/validate", json={"grader": grader},
                           headers=api.headers("beta")).status_code == 200


def test_limits_are_per_key_not_per_organization(make_api):
    api = make_api(rate_limit_uploads_per_minute=1)
    with api.session() as session:
        _, second_key = create_api_key(session, "alpha")  # a second key of the same organization
    api.upload_ok()
    assert_rate_limited(api.upload(chat_file()))
    response = api.client.post(
        "/v1/files", headers={"Authorization": f"Bearer {second_key}"},
        files={"file": ("t.jsonl", chat_file())}, data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200


def test_a_bad_key_is_401_not_429(make_api):
    api = make_api(require_auth=True, rate_limit_uploads_per_minute=1)
    api.upload_ok()
    response = api.client.post("/v1/files", headers={"Authorization": "Bearer sk-svfit-nope"},
                               files={"file": ("t.jsonl", chat_file())}, data={"purpose": "fine-tune"})
    assert_envelope(response, 401, "invalid_api_key")


def test_zero_turns_a_limit_off(make_api):
    api = make_api(rate_limit_uploads_per_minute=0)
    for _ in range(5):
        api.upload_ok()


def test_the_bucket_refills_with_time(make_api):
    api = make_api(rate_limit_uploads_per_minute=2)
    clock = FakeClock()
    api.app.state.rate_limiter = MemoryRateLimiter(clock=clock)
    api.upload_ok()
    api.upload_ok()
    response = api.upload(chat_file())
    assert_rate_limited(response)
    assert response.headers["retry-after"] == "30"  # 2 a minute: one token every 30 s
    clock.now += 29
    assert_rate_limited(api.upload(chat_file()))
    clock.now += 1.5
    assert api.upload(chat_file()).status_code == 200


def test_memory_bucket_allows_a_minute_then_the_rate():
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    assert [limiter.acquire("k", 60) for _ in range(60)] == [0.0] * 60  # a full minute's burst
    assert limiter.acquire("k", 60) == pytest.approx(1.0)
    clock.now += 0.5
    assert limiter.acquire("k", 60) == pytest.approx(0.5)  # a refused request takes nothing
    clock.now += 0.5
    assert limiter.acquire("k", 60) == 0.0
    assert limiter.acquire("other", 60) == 0.0


@pytest.mark.redis
def test_redis_buckets_are_shared_by_api_processes():
    redis = pytest.importorskip("redis")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis is not reachable: {exc}")
    prefix = f"svfit:test:ratelimit:{uuid.uuid4().hex}:"
    one, two = RedisRateLimiter(REDIS_URL, prefix=prefix), RedisRateLimiter(REDIS_URL, prefix=prefix)
    try:
        assert [one.acquire("key-a", 3), two.acquire("key-a", 3), one.acquire("key-a", 3)] == [0.0, 0.0, 0.0]
        assert two.acquire("key-a", 3) == pytest.approx(20.0, abs=0.5)  # 3 a minute: next token in 20 s
        assert one.acquire("key-b", 3) == 0.0
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)


def test_redis_unreachable_fails_open():
    limiter = RedisRateLimiter("redis://127.0.0.1:1/0")
    assert limiter.acquire("key", 1) == 0.0
    assert limiter.acquire("key", 1) == 0.0


def test_the_store_follows_the_broker(tmp_path):
    from api.core.rate_limit import limiter_for
    from api.core.settings import Settings

    embedded = Settings(data_dir=tmp_path)
    assert isinstance(limiter_for(embedded), MemoryRateLimiter)
    assert isinstance(limiter_for(Settings(data_dir=tmp_path, broker_url=REDIS_URL)), RedisRateLimiter)
    assert isinstance(limiter_for(Settings(data_dir=tmp_path, broker_url=REDIS_URL, rate_limit_store="memory")),
                      MemoryRateLimiter)
    with pytest.raises(ValueError, match="needs a Redis"):
        limiter_for(Settings(data_dir=tmp_path, rate_limit_store="redis"))
