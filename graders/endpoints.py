"""The bodies of OpenAI's `POST /v1/fine_tuning/alpha/graders/validate` and `/graders/run`, as plain
functions for the API's routes: a request body (the parsed JSON) in, a response body out, GraderError
(400) for a request that cannot be accepted. No HTTP here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graders.context import CompleteFn
from graders.errors import INVALID_PARAMETER, MISSING_PARAMETER, GraderError
from graders.fields import type_name
from graders.limits import MAX_SAMPLE_CHARS
from graders.running import compile_grader
from graders.validation import validate_grader


def _body(body: Any) -> Mapping:
    if not isinstance(body, Mapping):
        raise GraderError(f"The request body must be a JSON object, not {type_name(body)}.", None, INVALID_PARAMETER)
    if "grader" not in body:
        raise GraderError("Missing required parameter 'grader'.", "grader", MISSING_PARAMETER)
    return body


def validate_request(body: Any) -> dict:
    """`{"grader": {...}}` -> `{"grader": {...}}` (the grader as given), or GraderError."""
    grader = _body(body)["grader"]
    validate_grader(grader, "grader")
    return {"grader": grader}


def run_request(body: Any, complete: CompleteFn | None = None) -> dict:
    """`{"grader": {...}, "model_sample": str, "item"?: any}` -> OpenAI's run response. The grader and the
    body are checked (GraderError); what the sample does is reported in the response, never raised."""
    body = _body(body)
    compiled = compile_grader(body["grader"], "grader")
    if "model_sample" not in body:
        raise GraderError("Missing required parameter 'model_sample'.", "model_sample", MISSING_PARAMETER)
    sample = body["model_sample"]
    if not isinstance(sample, str):
        message = f"'model_sample' must be a string, not {type_name(sample)}."
        raise GraderError(message, "model_sample", INVALID_PARAMETER)
    if len(sample) > MAX_SAMPLE_CHARS:
        message = f"'model_sample' is {len(sample)} characters long; the limit is {MAX_SAMPLE_CHARS}."
        raise GraderError(message, "model_sample", INVALID_PARAMETER)
    return compiled.run(sample, body.get("item"), complete).to_openai()
