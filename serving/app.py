"""The serving replica's application factory: the inference engine, the models it serves, the OpenAI
inference endpoints and vLLM's adapter endpoints behind the shared token, and (given the address it
advertises) its heartbeat in the registry. `svfit serving` runs it; `svfit serve` runs one in-process.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from api.core.error_handlers import register_error_handlers
from api.core.gc_pauses import freeze_long_lived
from api.core.replicas import ReplicaState
from api.core.settings import Settings
from api.core.storage import storage_for
from serving import adapter_routes, routes
from serving.deps import ServingToken
from serving.engine import InferenceEngine
from serving.heartbeat import Heartbeat
from serving.served_models import ServedModels


class MissingServingToken(ValueError):
    """A replica without SVFIT_SERVING_TOKEN would answer anyone who can reach its port."""


class InFlightCounter:
    """The requests a replica is answering (a stream until its last byte): the router's load signal."""

    def __init__(self) -> None:
        self.count = 0


class CountInFlight:
    """ASGI middleware: inference and adapter POSTs count while they run."""

    def __init__(self, app: ASGIApp, counter: InFlightCounter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        self.counter.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter.count -= 1


def free_memory_bytes(device: str) -> int | None:
    """Free accelerator memory on a GPU replica, available host memory on a CPU one."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _device_name(setting: str) -> str:
    from serving.servable_models import resolve_device

    return str(resolve_device(setting))


def create_serving_app(settings: Settings, *, advertise_url: str | None = None) -> FastAPI:
    """A replica over `settings`. With `advertise_url` (how the API reaches it) it registers and beats."""
    if not settings.serving_token:
        raise MissingServingToken("Set SVFIT_SERVING_TOKEN: a serving replica only answers callers that send it.")
    storage = storage_for(settings)
    inference = InferenceEngine(settings)  # its thread starts with the first inference request
    served = ServedModels(settings, storage)
    in_flight = InFlightCounter()
    started_at = time.time()
    replica_id = f"replica-{uuid.uuid4().hex[:12]}"
    device = _device_name(settings.inference_device)

    def describe() -> ReplicaState:
        bases = served.bases()
        base_by_path = {str(path): base for base, path in bases.items()}
        loaded = sorted({base_by_path[w] for _kind, w in inference.stats().get("lanes", []) if w in base_by_path})
        return ReplicaState(
            id=replica_id, url=advertise_url or "", engine="native", device=device,
            servable_bases=tuple(sorted(bases)), loaded_bases=tuple(loaded), adapters=tuple(served.adapters()),
            max_adapters=served.max_adapters, free_memory_bytes=free_memory_bytes(device),
            in_flight=in_flight.count, started_at=started_at,
        )

    heartbeat = Heartbeat(settings, describe) if advertise_url else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        freeze_long_lived("start-up")
        if heartbeat is not None:
            await run_in_threadpool(heartbeat.start)
        try:
            yield
        finally:
            if heartbeat is not None:
                await run_in_threadpool(heartbeat.stop)
            await run_in_threadpool(inference.stop)

    app = FastAPI(title="SVFit serving replica", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.inference = inference
    app.state.served_models = served
    app.state.replica_id = replica_id
    app.state.describe = describe
    app.state.heartbeat = heartbeat
    register_error_handlers(app)
    app.include_router(adapter_routes.health_router)
    app.include_router(adapter_routes.router)
    app.include_router(routes.router, prefix="/v1", dependencies=[ServingToken])
    app.add_middleware(CountInFlight, counter=in_flight)
    return app
