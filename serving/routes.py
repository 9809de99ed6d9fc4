"""A replica's inference endpoints: `/v1/completions`, `/v1/chat/completions`, `/v1/embeddings` and
`/v1/classifications` (extension).

Thin async endpoints: resolve the model (a base, or an adapter loaded by name), submit to the inference engine,
and either wait for the whole answer or stream it as server-sent events (`data: <chunk>` … `data: [DONE]`).
Both shapes are built from the same engine events, so a streamed answer equals the non-streamed one. When
the client goes away, the request's rows are cancelled and leave the batch at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from api.core.errors import InvalidParameter, ServiceError
from api.core.ids import new_id
from serving.deps import EngineDep, ServedModelsDep, SettingsDep
from serving.engine import GenerationTicket
from serving.types import ChoiceFinished, GenerationDone, TextDelta
from serving.openai_shapes import CompletionLogprobsWriter, base64_floats, chat_logprobs
from serving.tool_use import ToolCallStream, ToolUse, tool_calls_of
from serving.schemas import (
    ChatChoice,
    ChatCompletionCreate,
    ChatCompletionPublic,
    ChatMessagePublic,
    ClassificationCreate,
    ClassificationPublic,
    ClassificationsPublic,
    CompletionChoice,
    CompletionCreate,
    CompletionPublic,
    EmbeddingCreate,
    EmbeddingPublic,
    EmbeddingsPublic,
    EmbeddingUsage,
    LabelProbability,
    Usage,
)
from serving import requests as inference_service

router = APIRouter(tags=["inference"])

# How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_S = 0.5
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads it


def _usage(done: GenerationDone) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


async def _collect(request: Request, ticket: GenerationTicket):
    """The whole answer, unless the client disconnects first (then the rows are cancelled)."""
    task = asyncio.ensure_future(ticket.collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
        ticket.cancel()  # a no-op once finished


async def _sse(ticket: GenerationTicket, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"
    except ServiceError as exc:  # the engine failed mid-stream: the client raises this as an APIError
        yield f"data: {json.dumps(exc.envelope())}\n\n"
    finally:
        # Reached on completion, on error, and when the server cancels the stream because the client left.
        ticket.cancel()


def _stream_response(ticket: GenerationTicket, chunks: AsyncIterator[dict]) -> StreamingResponse:
    return StreamingResponse(
        _sse(ticket, chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _chunks(
    ticket: GenerationTicket,
    header: dict,
    include_usage: bool,
    opening: Callable[[int], dict] | None,
    text_choice: Callable[[TextDelta], dict],
    final_choice: Callable[[int, str], dict],
) -> AsyncIterator[dict]:
    """Chunk dicts from engine events: an optional opening chunk per choice, one per text delta and per
    finish, and a usage chunk (empty choices) at the end when asked for."""
    extra = {"usage": None} if include_usage else {}
    if opening is not None:
        for index in range(ticket.admission.choices):
            yield {**header, "choices": [opening(index)], **extra}
    async for event in ticket.stream():
        if isinstance(event, TextDelta):
            yield {**header, "choices": [text_choice(event)], **extra}
        elif isinstance(event, ChoiceFinished):
            yield {**header, "choices": [final_choice(event.index, event.finish_reason)], **extra}
        elif isinstance(event, GenerationDone) and include_usage:
            yield {**header, "choices": [], "usage": _usage(event)}


# With `stream: true` the answer is server-sent events instead of the JSON object.
STREAMABLE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                    "description": "The completion, or with `stream: true` its chunks as server-sent events."}}


@router.post("/completions", response_model=CompletionPublic, responses=STREAMABLE)
async def create_completion(
    body: CompletionCreate,
    request: Request,
    settings: SettingsDep,
    served: ServedModelsDep,
    engine: EngineDep,
):
    ref = served.resolve(body.model)
    ticket = await engine.generate(inference_service.completion_request(body, ref, settings))
    header = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": body.model}
    wants_logprobs = body.logprobs is not None
    logprobs = CompletionLogprobsWriter(with_top=bool(body.logprobs))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream_response(ticket, _chunks(
            ticket, header, include_usage, None,
            lambda e: {"text": e.text, "index": e.index,
                       "logprobs": logprobs(e.index, e.logprobs) if wants_logprobs else None, "finish_reason": None},
            lambda i, reason: {"text": "", "index": i, "logprobs": None, "finish_reason": reason},
        ))
    answer = await _collect(request, ticket)
    if answer is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    choices, done = answer
    return CompletionPublic(
        id=header["id"], created=header["created"], model=body.model, usage=Usage(**_usage(done)),
        choices=[
            CompletionChoice(text=c.text, index=c.index, finish_reason=c.finish_reason,
                             logprobs=logprobs(c.index, c.logprobs) if wants_logprobs else None)
            for c in choices
        ],
    )


@router.post("/chat/completions", response_model=ChatCompletionPublic, responses=STREAMABLE)
async def create_chat_completion(
    body: ChatCompletionCreate,
    request: Request,
    settings: SettingsDep,
    served: ServedModelsDep,
    engine: EngineDep,
):
    ref = served.resolve(body.model)
    ticket = await engine.generate(inference_service.chat_request(body, ref, settings))
    header = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time()),
              "model": body.model, "system_fingerprint": None}
    wants_logprobs = bool(body.logprobs)
    use = ticket.request.tool_use if ticket.request.tool_use and ticket.request.tool_use.tools else None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if use is not None:
            return _stream_response(ticket, _tool_chunks(ticket, header, include_usage, use, wants_logprobs))
        return _stream_response(ticket, _chunks(
            ticket, header, include_usage,
            lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None},
            lambda e: {"index": e.index, "delta": {"content": e.text},
                       "logprobs": chat_logprobs(e.logprobs) if wants_logprobs else None, "finish_reason": None},
            lambda i, reason: {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason},
        ))
    answer = await _collect(request, ticket)
    if answer is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    choices, done = answer
    return ChatCompletionPublic(
        id=header["id"], created=header["created"], model=body.model, usage=Usage(**_usage(done)),
        choices=[_chat_choice(c, use, wants_logprobs) for c in choices],
    )


def _chat_choice(choice, use: ToolUse | None, wants_logprobs: bool) -> ChatChoice:  # noqa: ANN001 - types.Choice
    """A finished chat choice; with tools, its calls read back from the text (finish_reason "tool_calls")."""
    content, calls = tool_calls_of(use, choice.text) if use is not None else (choice.text, [])
    return ChatChoice(
        index=choice.index, message=ChatMessagePublic(content=content, tool_calls=calls or None),
        finish_reason="tool_calls" if calls and choice.finish_reason == "stop" else choice.finish_reason,
        logprobs=chat_logprobs(choice.logprobs) if wants_logprobs else None,
    )


async def _tool_chunks(
    ticket: GenerationTicket, header: dict, include_usage: bool, use: ToolUse, wants_logprobs: bool
) -> AsyncIterator[dict]:
    """A chat answer with tools as chunks: text as content deltas, each call as one `tool_calls` delta (index,
    id, name and the whole arguments) once it is complete, and finish_reason "tool_calls" when one was made.
    Log probabilities ride on the next chunk out of their text."""
    extra = {"usage": None} if include_usage else {}
    streams = {i: ToolCallStream(use) for i in range(ticket.admission.choices)}
    held: dict[int, list] = {i: [] for i in streams}

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> dict:
        entries, held[index] = held[index], []
        logprobs = chat_logprobs(entries) if wants_logprobs and entries else None
        return {**header, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                       "finish_reason": finish_reason}], **extra}

    for index in streams:
        yield chunk(index, {"role": "assistant", "content": ""})
    async for event in ticket.stream():
        if isinstance(event, TextDelta):
            held[event.index].extend(event.logprobs)
            for delta in streams[event.index].feed(event.text):
                yield chunk(event.index, delta)
        elif isinstance(event, ChoiceFinished):
            stream = streams[event.index]
            for delta in stream.finish():
                yield chunk(event.index, delta)
            reason = "tool_calls" if stream.calls and event.finish_reason == "stop" else event.finish_reason
            yield chunk(event.index, {}, reason)
        elif isinstance(event, GenerationDone) and include_usage:
            yield {**header, "choices": [], "usage": _usage(event)}


@router.post("/embeddings")
async def create_embedding(
    body: EmbeddingCreate,
    served: ServedModelsDep,
    engine: EngineDep,
) -> EmbeddingsPublic:
    """Unit-length embeddings from an encoder base model or a classification fine-tune of one."""
    ref = served.resolve(body.model)
    result = await engine.embed(inference_service.embedding_request(body, ref))
    width = len(result.vectors[0])
    if body.dimensions is not None and body.dimensions != width:
        raise InvalidParameter(f"This model's embeddings have {width} dimensions; 'dimensions' cannot change that.",
                               param="dimensions")
    data = [
        EmbeddingPublic(index=i, embedding=base64_floats(v) if body.encoding_format == "base64" else v)
        for i, v in enumerate(result.vectors)
    ]
    return EmbeddingsPublic(data=data, model=body.model,
                            usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens))


@router.post("/classifications")
async def create_classification(
    body: ClassificationCreate,
    served: ServedModelsDep,
    engine: EngineDep,
) -> ClassificationsPublic:
    """Extension: the label probabilities of each input (a text, or a text pair) under a classification fine-tune."""
    ref = served.resolve(body.model)
    result = await engine.classify(inference_service.classification_request(body.input, ref))
    data = []
    for index, probs in enumerate(result.probabilities):
        ranked = sorted(zip(result.labels, probs), key=lambda lp: lp[1], reverse=True)
        data.append(ClassificationPublic(
            index=index,
            label=ranked[0][0],
            labels=[LabelProbability(label=label, probability=p) for label, p in ranked],
        ))
    return ClassificationsPublic(
        id=new_id("clf"), model=body.model, data=data,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=0, total_tokens=result.prompt_tokens),
    )
