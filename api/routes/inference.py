"""`/v1/completions`, `/v1/chat/completions`, `/v1/embeddings` and `/v1/classifications` (extension), routed.

The API checks the key, the rate limit and which of the organization's models the request names, then
forwards the body unchanged to a serving replica (api/routing), which validates it and answers; its answer,
streamed or whole, errors included, comes back as it was sent.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from api.core.errors import InvalidParameter, MissingParameter
from api.deps import CurrentOrg, ForwarderDep, InferenceRateLimit, SessionDep, run_in_session
from api.routing.forwarder import Forwarder
from api.core.route_targets import base_target, resolve_target

# Every inference request takes a token from the caller's inference bucket (429 + Retry-After when empty).
router = APIRouter(tags=["inference"], dependencies=[InferenceRateLimit])

# Read (and parsed as a JSON object) before any dependency runs, as a typed body would be: an oversized or
# malformed body is refused before authentication, the same on every route. The replica validates the rest.
JsonObject = Annotated[dict[str, Any], Body(description="The OpenAI request body; `model` names the model.")]
# With `stream: true` the answer is server-sent events instead of the JSON object.
STREAMABLE = {200: {"content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}},
                    "description": "The answer, or with `stream: true` its chunks as server-sent events."}}


def _model_and_stream(body: dict[str, Any]) -> tuple[str, bool]:
    """The two fields the router reads; everything else is the replica's to validate."""
    model = body.get("model")
    if model is None:
        raise MissingParameter("Missing required parameter: 'model'.", param="model")
    if not isinstance(model, str):
        raise InvalidParameter("Invalid value for 'model': it must be a model id (a string).", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidParameter("Invalid value for 'stream': Input should be a valid boolean.", param="stream")
    return model, bool(stream)


async def _route(path: str, body: dict[str, Any], request: Request, session: Session, org_id: str,
                 forwarder: Forwarder) -> Response:
    model, stream = _model_and_stream(body)
    target = base_target(model) or await run_in_session(session, resolve_target, org_id, model)
    # The bytes as the client sent them (Starlette keeps what it read to parse them): forwarded unchanged.
    return await forwarder.forward(request, path, await request.body(), target, stream)


@router.post("/completions", responses=STREAMABLE)
async def create_completion(
    body: JsonObject, request: Request, session: SessionDep, org_id: CurrentOrg, forwarder: ForwarderDep
):
    """OpenAI's completions: `prompt` as text or token ids, sampling options, `stream`, `logprobs`, `echo`."""
    return await _route("completions", body, request, session, org_id, forwarder)


@router.post("/chat/completions", responses=STREAMABLE)
async def create_chat_completion(
    body: JsonObject, request: Request, session: SessionDep, org_id: CurrentOrg, forwarder: ForwarderDep
):
    """OpenAI's chat completions: `messages` through the model's chat template, sampling options, `stream`."""
    return await _route("chat/completions", body, request, session, org_id, forwarder)


@router.post("/embeddings")
async def create_embedding(
    body: JsonObject, request: Request, session: SessionDep, org_id: CurrentOrg, forwarder: ForwarderDep
):
    """Unit-length embeddings from an encoder base model or a classification fine-tune of one."""
    return await _route("embeddings", body, request, session, org_id, forwarder)


@router.post("/classifications")
async def create_classification(
    body: JsonObject, request: Request, session: SessionDep, org_id: CurrentOrg, forwarder: ForwarderDep
):
    """Extension: the label probabilities of each input (a text, or a text pair) under a classification fine-tune."""
    return await _route("classifications", body, request, session, org_id, forwarder)
