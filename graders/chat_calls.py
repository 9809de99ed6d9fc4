"""A model grader's call as a chat completions request, and the answer read back: the one wire format the
API's router (`/v1/fine_tuning/alpha/graders/run`) and a reinforcement job's worker both send to a serving
replica. Plain JSON in and out; who carries the bytes is the caller's business."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from graders.context import ModelAnswer

# A grader's sampling_params under chat completions' names. reasoning_effort has nothing to set on the models
# served here, so it is not sent.
SAMPLING_NAMES = {"max_completions_tokens": "max_completion_tokens", "temperature": "temperature",
                  "top_p": "top_p", "seed": "seed"}


class HostedModelError(RuntimeError):
    """The hosted model refused the request or answered something that is not a chat completion."""


def chat_body(model: str, messages: list[dict], sampling_params: Mapping[str, Any]) -> bytes:
    """A chat completions request: the rendered messages and the grader's sampling options. Without
    max_completions_tokens the answer may run to the end of the context, as a client's would."""
    options = {SAMPLING_NAMES[name]: value for name, value in sampling_params.items() if name in SAMPLING_NAMES}
    return json.dumps({"model": model, "messages": messages, **options}).encode()


def model_answer(status: int, content: bytes) -> ModelAnswer:
    """The text, usage and refusal of a chat completion; HostedModelError (model_grader_server_error) for an
    error answer, with its status, code and message."""
    try:
        answer = json.loads(content)
    except ValueError:
        answer = None
    if status != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(error, dict):
            raise HostedModelError(f"{status} {error.get('code')}: {error.get('message')}")
        raise HostedModelError(f"{status}: {content[:200]!r}")
    try:
        message = answer["choices"][0]["message"]
        text = message.get("content") or ""
    except (TypeError, KeyError, IndexError, AttributeError):
        raise HostedModelError(f"the answer is not a chat completion: {content[:200]!r}") from None
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else None
    if usage is not None:
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        usage = {**usage, "cached_tokens": cached} if type(cached) is int else usage
    return ModelAnswer(text=text if isinstance(text, str) else str(text), usage=usage, refusal=message.get("refusal"))
