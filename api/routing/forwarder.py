"""Relays one inference request to a serving replica and its answer back, unchanged; `ask` sends one of the
API's own (a model grader asking a hosted model) the same way and returns the answer whole.

Before the first byte a replica that cannot be reached is left out and the next one tried; with none left the
client gets 503 `no_serving_replica` with Retry-After. A stream is relayed event by event as the replica
writes it (the client's reading paces ours: backpressure); a client that leaves closes the upstream
request, which the replica sees and cancels. A replica that dies mid-answer ends a stream with an SSE error
event, or a non-streamed answer with 502 `serving_replica_failed`, as soon as its connection drops.

The client is aiohttp's: on this path it costs a sixth of httpx's CPU per request (0.3 ms against 2 ms
measured on the 2-core CI machine), which is most of what the router adds to a request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.core.errors import ServiceError, ServingReplicaFailed
from api.core.settings import Settings
from api.core.storage import Storage
from api.core.lora_exports import lora_export_dir
from api.routing.pool import ReplicaPool, ReplicaView
from api.core.route_targets import RouteTarget

# How often a non-streamed request checks that its client is still there.
DISCONNECT_POLL_S = 0.5
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads it
# The replica's answer headers worth passing on; the rest (length, encoding, date, server) are the relay's.
PASSED_HEADERS = ("content-type", "retry-after", "retry-after-ms", "cache-control", "x-accel-buffering",
                  "x-kept-energy")
# Failures that mean no working replica took the request: safe to try the next one. A kept-alive connection
# to a replica that has since died fails as a disconnect before any answer.
UNREACHABLE = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.ServerDisconnectedError)


def _sse_error(error: ServiceError) -> bytes:
    return f"data: {json.dumps(error.envelope())}\n\n".encode()


def _headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    return {name: upstream.headers[name] for name in PASSED_HEADERS if name in upstream.headers}


class Forwarder:
    def __init__(self, settings: Settings, pool: ReplicaPool, storage: Storage) -> None:
        self.settings = settings
        self.pool = pool
        self.storage = storage
        self.auth = {"Authorization": f"Bearer {settings.serving_token or ''}"}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """Made on first use: an aiohttp session belongs to the event loop that serves requests."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, connect=self.settings.serving_connect_timeout_s,
                                            sock_read=self.settings.serving_read_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                                  auto_decompress=False)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(self, request: Request, path: str, body: bytes, target: RouteTarget, stream: bool) -> Response:
        view, upstream = await self._send(path, body, target)
        # From here the relay releases the replica's in-flight count when the answer is done.
        if stream and upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(self._events(view, upstream), status_code=upstream.status,
                                     headers=_headers(upstream))
        return await self._whole(request, view, upstream)

    async def ask(self, path: str, body: bytes, target: RouteTarget) -> tuple[int, bytes]:
        """One non-streamed request for the API's own use (a model grader asking a hosted model), chosen and
        sent exactly as a client's: the replica's status and whole body, errors included."""
        view, upstream = await self._send(path, body, target)
        try:
            return upstream.status, await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ServingReplicaFailed("The serving replica stopped in the middle of this answer; retry.") from exc
        finally:
            view.in_flight -= 1
            upstream.close()

    async def check_servable(self, target: RouteTarget) -> None:
        """Raise what a request for `target` would be refused with before reaching a replica: UnknownModel
        (no replica serves it: it does not exist for this organization) or NoServingReplica."""
        await self.pool.refresh()
        self.pool.choose(target, set())

    async def _send(self, path: str, body: bytes, target: RouteTarget) -> tuple[ReplicaView, aiohttp.ClientResponse]:
        """The first replica that takes the request, counted in flight (the caller releases it), and its answer
        with the headers read."""
        await self.pool.refresh()
        tried: set[str] = set()
        while True:
            view = self.pool.choose(target, tried)
            tried.add(view.state.id)
            view.in_flight += 1
            released = False
            try:
                upstream = await self._open(view, path, body, target)
                if upstream is None:
                    continue  # unreachable: the next replica
                if target.adapter_key is None:
                    view.bases.add(target.base_id)
                released = True
                return view, upstream
            finally:
                if not released:
                    view.in_flight -= 1

    async def _open(self, view: ReplicaView, path: str, body: bytes,
                    target: RouteTarget) -> aiohttp.ClientResponse | None:
        """The replica's answer, headers read and body not yet; None when the replica cannot be reached. A 404
        for an adapter gets one more try after loading it again; the second answer is returned as it is."""
        for attempt in range(2):
            try:
                if target.adapter_key is not None and target.model_id not in view.adapters:
                    await self._load(view, target)
                upstream = await self.session.post(
                    f"{view.state.url}/v1/{path}", data=body,
                    headers={**self.auth, "Content-Type": "application/json"},
                )
            except UNREACHABLE:
                self.pool.failed(view)
                return None
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise ServingReplicaFailed(f"The serving replica failed before answering ({type(exc).__name__}).") \
                    from exc
            if upstream.status == 404 and target.adapter_key is not None and attempt == 0:
                # It no longer has the adapter (restarted, or its own limit unloaded it): load it and ask again.
                upstream.release()
                self.pool.forget_adapter(view, target.model_id)
                continue
            if target.adapter_key is not None:
                for name in self.pool.used_adapter(view, target.model_id):
                    asyncio.ensure_future(self._unload(view, name))
            return upstream
        raise AssertionError("unreachable: the second attempt always returns")

    async def _load(self, view: ReplicaView, target: RouteTarget) -> None:
        """vLLM's load_lora_adapter: our replicas read the adapter's folder from the store by key; an external
        engine gets a PEFT LoRA folder exported at the serving rank (built once, kept in the store)."""
        path = target.adapter_key
        if view.state.engine != "native":
            rank = min(self.settings.serving_lora_rank, view.state.max_lora_rank or self.settings.serving_lora_rank)
            path = str(await run_in_threadpool(lora_export_dir, self.storage, self.settings, target, rank))
        async with self.session.post(
            f"{view.state.url}/v1/load_lora_adapter", headers=self.auth,
            json={"lora_name": target.model_id, "lora_path": path, "base_model_name": target.base_id},
        ) as answer:
            text = await answer.text()
            already = answer.status == 400 and "already" in text  # vLLM's answer to a second load
            if answer.status != 200 and not already:
                raise _replica_error(answer.status, text)
        self.pool.used_adapter(view, target.model_id)

    async def _unload(self, view: ReplicaView, name: str) -> None:
        try:
            async with self.session.post(f"{view.state.url}/v1/unload_lora_adapter", headers=self.auth,
                                         json={"lora_name": name}):
                pass
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass  # it is gone or busy; its own limit unloads what it must

    async def _events(self, view: ReplicaView, upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """Whole SSE events as the replica sends them; an error event if it dies mid-stream."""
        pending = b""
        try:
            async for chunk in upstream.content.iter_any():
                pending += chunk
                end = pending.rfind(b"\n\n")
                if end >= 0:
                    yield pending[: end + 2]
                    pending = pending[end + 2 :]
            if pending:
                yield pending
        except (aiohttp.ClientError, asyncio.TimeoutError):
            yield _sse_error(ServingReplicaFailed("The serving replica stopped in the middle of this answer; retry."))
        finally:
            view.in_flight -= 1
            upstream.close()  # mid-stream (the client left): drops the connection, so the replica cancels

    async def _whole(self, request: Request, view: ReplicaView, upstream: aiohttp.ClientResponse) -> Response:
        reading = asyncio.ensure_future(upstream.read())
        try:
            while True:
                done, _ = await asyncio.wait({reading}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if await request.is_disconnected():
                    return Response(status_code=CLIENT_CLOSED_REQUEST)
            try:
                content = reading.result()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise ServingReplicaFailed("The serving replica stopped in the middle of this answer; retry.") from exc
            return Response(content, status_code=upstream.status, headers=_headers(upstream))
        finally:
            if not reading.done():
                reading.cancel()
            view.in_flight -= 1
            upstream.close()


def _replica_error(status: int, text: str) -> ServiceError:
    """The replica's own error envelope (status, code, param) as ours, or a plain 502."""
    try:
        error = json.loads(text)["error"]
        exc = ServiceError(error["message"], error.get("param"), code=error.get("code"))
        exc.status, exc.type = status, error.get("type", "server_error")
        return exc
    except (ValueError, KeyError, TypeError):
        return ServingReplicaFailed(f"The serving replica refused to load the adapter ({status}).")
