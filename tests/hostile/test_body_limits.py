"""Request bodies over the JSON limit (`max_json_body_bytes`) on every JSON endpoint: a 413 in the envelope
(`request_too_large`), whether the body declares its length or streams without one, before any of it
is parsed and before authentication (so an anonymous client cannot make the API hold a huge body)."""

from __future__ import annotations

import json

import pytest

from tests.hostile.conftest import assert_envelope, row_counts

LIMIT = 64 * 1024
ENDPOINTS = ["/v1/fine_tuning/jobs", "/v1/completions", "/v1/chat/completions", "/v1/classifications",
             "/v1/fine_tuning/alpha/graders/validate", "/v1/fine_tuning/alpha/graders/run"]


def big_body() -> bytes:
    return json.dumps({"model": "m", "prompt": "x" * (4 * LIMIT), "metadata": {"k": "v"}}).encode()


def pieces(body: bytes, size: int = 8192):  # noqa: ANN201
    return (body[i:i + size] for i in range(0, len(body), size))


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("how", ["declared", "chunked"])
def test_json_bodies_over_the_limit_are_413(make_api, path: str, how: str):
    api = make_api(require_auth=True, max_json_body_bytes=LIMIT)
    body = big_body()
    response = api.client.post(
        path, content=body if how == "declared" else pieces(body),
        headers={"Content-Type": "application/json"},  # no key at all: refused before authentication
    )
    assert_envelope(response, 413, "request_too_large", None)
    assert set(row_counts(api).values()) == {0}


def test_a_body_just_under_the_limit_is_read(make_api):
    api = make_api(max_json_body_bytes=LIMIT, serving=True)
    body = json.dumps({"model": "no-such-model", "input": "x" * (LIMIT - 100)}).encode()
    response = api.client.post("/v1/classifications", content=pieces(body), headers={**api.headers(),
                               "Content-Type": "application/json"})
    assert_envelope(response, 404, "model_not_found", "model")  # parsed whole, then refused for the model


def test_a_grader_run_just_under_the_limit_is_read(make_api):
    api = make_api(max_json_body_bytes=LIMIT)
    grader = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "x",
              "operation": "eq"}
    body = json.dumps({"grader": grader, "model_sample": "x" * (LIMIT - 300)}).encode()
    response = api.client.post("/v1/fine_tuning/alpha/graders/run", content=pieces(body),
                               headers={**api.headers(), "Content-Type": "application/json"})
    assert response.status_code == 200 and response.json()["reward"] == 0.0, response.text


def test_an_upload_content_type_does_not_buy_a_json_endpoint_the_upload_limit(make_api):
    api = make_api(max_json_body_bytes=LIMIT, serving=True)
    response = api.client.post("/v1/fine_tuning/jobs", content=b"x" * (2 * LIMIT),
                               headers={**api.headers(), "Content-Type": "multipart/form-data; boundary=x"})
    assert_envelope(response, 413, "request_too_large", None)
