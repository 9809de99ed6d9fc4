"""run_grader and friends: OpenAI's run response shape, the two request bodies, batches, and the promise
that nothing a sample does raises."""

from __future__ import annotations

import threading

import pytest
from openai.types.fine_tuning.alpha import GraderRunResponse, GraderValidateResponse
from openai.types.fine_tuning.alpha.grader_run_response import MetadataErrors

from graders import (
    ERROR_FLAGS,
    GraderError,
    ModelAnswer,
    compile_grader,
    run_grader,
    run_graders_batch,
    run_request,
    validate_request,
)
from graders import metrics
from tests.graders.builders import multi, score_model, string_check, text_similarity


def test_the_run_response_has_openais_shape():
    grader = multi({"exact": string_check(), "judge": score_model()}, "(exact + judge) / 2")
    answer = ModelAnswer('{"result": 0.5}', usage={"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12})
    body = run_grader(grader, "Paris", {"answer": "Paris"}, complete=lambda *a: answer).to_openai()
    parsed = GraderRunResponse.model_validate(body)
    assert parsed.reward == 0.75
    assert parsed.sub_rewards == {"exact": 1.0, "judge": 0.5}
    assert parsed.metadata.name == "combined" and parsed.metadata.type == "multi"
    assert parsed.metadata.token_usage == 12 and parsed.metadata.sampled_model_name == "judge-model"
    assert parsed.api_model_grader_token_usage_per_model == {
        "judge-model": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    }
    assert parsed.metadata.execution_time >= 0
    # Every flag of OpenAI's errors object, and nothing it does not know but the details.
    aliases = {field.alias or name for name, field in MetadataErrors.model_fields.items()}
    assert set(body["metadata"]["errors"]) == aliases
    assert set(ERROR_FLAGS) <= aliases
    assert not any(parsed.metadata.errors.model_dump(exclude_none=True).values())


def test_a_failed_sample_sets_its_flag_in_the_response():
    body = run_grader(string_check(reference="{{item.nope}}"), "Paris", {}).to_openai()
    assert body["reward"] == 0.0
    assert body["metadata"]["errors"]["invalid_variable_error"] is True
    [detail] = body["metadata"]["error_details"]
    assert (detail["flag"], detail["grader"]) == ("invalid_variable_error", "grader")
    assert "item.nope" in detail["message"]
    GraderRunResponse.model_validate(body)


def test_nothing_a_sample_does_raises(monkeypatch):
    def broken(a, b):
        raise KeyError("bug in a metric")

    monkeypatch.setitem(metrics.METRICS, "rouge_1", broken)
    result = run_grader(text_similarity("rouge_1"), "Paris", {"answer": "Paris"})
    assert result.reward == 0.0 and result.error_flags["other_error"]
    assert "KeyError" in result.errors[0].message
    result = run_grader(string_check(), None, {"answer": "Paris"})  # not a string
    assert result.reward == 0.0 and result.error_flags["sample_parse_error"]
    result = run_grader(string_check(), "Paris", ["not", "an", "object"])
    assert result.error_flags["invalid_variable_error"]


def test_only_an_invalid_grader_raises():
    with pytest.raises(GraderError) as caught:
        run_grader(string_check("bad"), "Paris", {})
    assert caught.value.param == "grader.operation"


def test_batches_keep_order_and_may_use_threads():
    grader = compile_grader(score_model(content="{{item.answer}}"))
    threads = set()

    def complete(model, messages, params):
        threads.add(threading.get_ident())
        return messages[0]["content"]

    pairs = [("s", {"answer": str(i / 10)}) for i in range(10)]
    for workers in (1, 4):
        results = run_graders_batch(grader, pairs, complete, max_workers=workers)
        assert [r.reward for r in results] == pytest.approx([i / 10 for i in range(10)])
    assert threading.get_ident() in threads  # the serial pass ran here; the threaded one wherever the pool put it
    assert [r.reward for r in grader.run_batch([("Paris", {"answer": "0.3"})], complete)] == [0.3]
    # Failures stay per sample.
    results = run_graders_batch(string_check(), [("Paris", {"answer": "Paris"}), ("Paris", {})])
    assert [(r.reward, r.ok) for r in results] == [(1.0, True), (0.0, False)]


def test_validate_request():
    grader = string_check()
    assert validate_request({"grader": grader}) == {"grader": grader}
    GraderValidateResponse.model_validate(validate_request({"grader": grader}))
    with pytest.raises(GraderError) as caught:
        validate_request({"grader": string_check("bad")})
    assert caught.value.param == "grader.operation"
    with pytest.raises(GraderError) as caught:
        validate_request({})
    assert (caught.value.param, caught.value.code) == ("grader", "missing_parameter")
    with pytest.raises(GraderError) as caught:
        validate_request(["grader"])
    assert caught.value.code == "invalid_parameter"


def test_run_request():
    body = run_request({"grader": string_check(), "model_sample": "Paris", "item": {"answer": "Paris"}})
    assert body["reward"] == 1.0 and body["metadata"]["type"] == "string_check"
    assert run_request({"grader": string_check(reference="x"), "model_sample": "x"})["reward"] == 1.0  # item optional
    with pytest.raises(GraderError) as caught:
        run_request({"grader": string_check()})
    assert (caught.value.param, caught.value.code) == ("model_sample", "missing_parameter")
    with pytest.raises(GraderError) as caught:
        run_request({"grader": string_check(), "model_sample": 3})
    assert (caught.value.param, caught.value.code) == ("model_sample", "invalid_parameter")
    with pytest.raises(GraderError) as caught:
        run_request({"grader": {"type": "python", "name": "p", "source": ""}, "model_sample": "x"})
    assert (caught.value.param, caught.value.code) == ("grader.type", "grader_not_supported")
