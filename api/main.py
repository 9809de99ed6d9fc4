"""The application factory: settings, database (checked to be migrated), store, dispatcher, inference router,
routes, errors.

`create_app()` builds everything an app needs into `app.state` and reads no globals afterwards, so tests
and the embedded server each get an app over their own data directory. `svfit api` and `svfit serve` (which
passes `auto_migrate=True`) build it with the worker's enqueue function.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.orm import sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.core.db import make_engine
from api.core.errors import PayloadTooLarge
from api.core.gc_pauses import freeze_long_lived
from api.core.job_queue import EnqueueJob
from api.core.migrations import ensure_up_to_date
from api.core.rate_limit import limiter_for
from api.core.settings import Settings, get_settings
from api.core.storage import storage_for
from api.core.error_handlers import error_response, register_error_handlers
from api.routes import files, graders as grader_routes, health, inference as inference_routes, jobs, models, ui
from api.routing.forwarder import Forwarder
from api.routing.pool import ReplicaPool
from api.schemas import ErrorEnvelope
from api.services.keys import DefaultOrganization

# Room for the multipart envelope around an upload of exactly the maximum size.
MULTIPART_OVERHEAD_BYTES = 64 * 1024

ERROR_RESPONSES = {
    status: {"model": ErrorEnvelope, "description": description}
    for status, description in {
        400: "Invalid request (the `param` names the field)",
        401: "Missing or invalid API key",
        403: "Not allowed (a base model cannot be deleted)",
        404: "No such object in this organization",
        413: "Upload too large",
        429: "Rate limit reached for this API key (see Retry-After)",
        500: "Server error",
        502: "The serving replica failed mid-answer; retry",
        503: "A dependency (database, job queue, serving replicas) is unavailable; retry",
    }.items()
}


class RequestSizeLimit:
    """Refuses a request body over its limit: an upload (multipart, to `upload_path`) up to the upload
    limit, any other body up to `max_json_bytes`.

    A declared Content-Length over the limit is refused before any of it is read: Starlette spools a
    multipart upload to disk, and reads a JSON body whole into memory, before a route runs. A body that
    declares no length (chunked) is counted as it arrives; at the limit the app is told the client left,
    its answer is dropped and a 413 sent instead, so neither the spool nor a parser holds more than that.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_json_bytes: int | None = None, upload_path: str = "/v1/files"):
        self.app = app
        self.max_bytes = max_bytes
        self.max_json_bytes = max_json_bytes if max_json_bytes is not None else max_bytes
        self.upload_path = upload_path

    def _limit(self, scope: Scope, headers: dict[bytes, bytes]) -> PayloadTooLarge:
        multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
        if multipart and scope["path"].rstrip("/") == self.upload_path:
            return PayloadTooLarge(f"The request exceeds the limit of {self.max_bytes} bytes.", param="file")
        return PayloadTooLarge(
            f"The request body exceeds the limit of {self.max_json_bytes} bytes.", code="request_too_large"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        too_large = self._limit(scope, headers)
        limit = self.max_bytes if too_large.param == "file" else self.max_json_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await error_response(too_large, headers={"Connection": "close"})(scope, receive, send)
            return

        received, cut_off, answered = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, cut_off
            if cut_off:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                cut_off = True
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if cut_off:
                return  # the app's answer to a body it never got whole; the 413 below replaces it
            answered = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not cut_off:
                raise
        if cut_off and not answered:
            await error_response(too_large, headers={"Connection": "close"})(scope, receive, send)


def create_app(settings: Settings | None = None, *, dispatch: EnqueueJob, auto_migrate: bool = False) -> FastAPI:
    """Build the API over `settings` (default: the environment's).

    Refuses (DatabaseNotMigrated) when the database is behind the code, unless `auto_migrate` is set;
    `dispatch` hands a committed job id to the workers (api/core/job_queue.py: the CLI passes the worker's).
    """
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    storage = storage_for(settings)  # first: a misconfigured bucket stops start-up before anything is open
    engine = make_engine(settings.database_url)
    try:
        ensure_up_to_date(engine, auto_migrate=auto_migrate)
    except BaseException:
        engine.dispose()
        raise

    sessions = sessionmaker(bind=engine, expire_on_commit=False)
    # Inference goes to serving replicas (api/routing); this process loads no model.
    forwarder = Forwarder(settings, ReplicaPool(settings, sessions), storage)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        freeze_long_lived("start-up")
        yield
        await forwarder.aclose()
        engine.dispose()

    app = FastAPI(
        title="SVFit fine-tuning service",
        summary="OpenAI-compatible fine-tuning (files, jobs, models) with SVFit, LoRA or full fine-tuning.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = sessions
    app.state.storage = storage
    app.state.dispatch = dispatch
    app.state.forwarder = forwarder
    app.state.rate_limiter = limiter_for(settings)
    app.state.default_org = DefaultOrganization(settings.default_org)

    register_error_handlers(app)
    app.add_middleware(
        RequestSizeLimit,
        max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
        max_json_bytes=settings.max_json_body_bytes,
    )

    app.include_router(health.router)
    # Each resource straight into the app, not through a `/v1` router: FastAPI matches a request once more
    # for every level of included routers, and on a polled route that is a tenth of the request's CPU.
    for resource in (files, jobs, grader_routes, models, inference_routes):
        app.include_router(resource.router, prefix="/v1", responses=ERROR_RESPONSES)
    ui.mount(app)
    return app
