"""OpenAI's graders for the `/v1/fine_tuning/alpha/graders` routes, over the graders library: a grader is checked
(a GraderError becomes InvalidGrader, a 400 naming the field's full path with the library's code), the models
its model graders name are listed by field, and `HostedModels.complete` asks those models through the
inference router, the path a client's `/v1/chat/completions` takes (api/routing), so a grader uses the
organization's own hosted base models and fine-tunes.

Grading blocks (text metrics, waiting on models), so the routes run it in a worker thread; `complete` runs in
that thread and hands each model call to the event loop, where the router's connections live.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import anyio.from_thread
from sqlalchemy.orm import Session

from api.core.errors import InvalidGrader, ServingReplicaFailed
from api.routing.forwarder import Forwarder
from api.routing.targets import RouteTarget, resolve_target
from graders import CompiledGrader, GraderError, ModelAnswer, compile_grader, run_request

MODEL_GRADER_TYPES = ("score_model", "label_model")
# A grader's sampling_params under chat completions' names. reasoning_effort has nothing to set on the models
# served here, so it is not sent.
SAMPLING_NAMES = {"max_completions_tokens": "max_completion_tokens", "temperature": "temperature",
                  "top_p": "top_p", "seed": "seed"}


def compile_checked(grader: Any) -> CompiledGrader:
    """The grader of a request body, compiled; InvalidGrader naming the field if it cannot run."""
    try:
        return compile_grader(grader, "grader")
    except GraderError as exc:
        raise InvalidGrader.of(exc) from exc


def run_checked(body: Mapping[str, Any], complete: Any = None) -> dict:
    """OpenAI's run response for `{"grader", "model_sample", "item"}`; InvalidGrader for a request that cannot
    run. What the sample does (a model that fails, an answer with no score) is in the response, never raised."""
    try:
        return run_request(body, complete)
    except GraderError as exc:
        raise InvalidGrader.of(exc) from exc


def model_fields(compiled: CompiledGrader) -> dict[str, str]:
    """The model each model grader of the tree names, by the full path of its `model` field
    (`grader.model`, `grader.graders.judge.model`)."""
    found: dict[str, str] = {}

    def visit(node: Any, path: str) -> None:
        if node.type == "multi":
            for key, sub in node.graders:
                visit(sub, f"{path}.graders.{key}")
        elif node.type in MODEL_GRADER_TYPES:
            found[f"{path}.model"] = node.model

    visit(compiled.node, compiled.path)
    return found


def fine_tune_targets(session: Session, org_id: str, models: Iterable[str]) -> dict[str, RouteTarget]:
    """Each `ft:` id's target for the organization, as an inference request's `model` resolves (another
    organization's fine-tune resolves as a base model no replica serves: not found)."""
    return {model: resolve_target(session, org_id, model) for model in models}


class HostedModelError(RuntimeError):
    """The hosted model refused the request or answered something that is not a chat completion."""


class HostedModels:
    """`complete` for the model graders of one request: each model already resolved to its target."""

    def __init__(self, forwarder: Forwarder, targets: Mapping[str, RouteTarget]) -> None:
        self.forwarder = forwarder
        self.targets = dict(targets)

    def complete(self, model: str, messages: list[dict], sampling_params: dict) -> ModelAnswer:
        """Runs in the grading thread (anyio's), so the request itself goes to the event loop."""
        body = chat_body(model, messages, sampling_params)
        try:
            status, content = anyio.from_thread.run(self.forwarder.ask, "chat/completions", body, self.targets[model])
        except ServingReplicaFailed as exc:
            if isinstance(exc.__cause__, TimeoutError):  # the replica went silent: unresponsive_reward_error
                raise TimeoutError(exc.message) from exc
            raise
        return model_answer(status, content)


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
