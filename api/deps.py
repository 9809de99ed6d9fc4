"""Request dependencies as `Annotated` aliases, so route signatures read like prose.

Everything comes from `app.state`, set once by `create_app()`: one settings object, one engine and
session factory, one store, the job dispatcher, the inference router, the rate limiter and the default
organization. Nothing here reads global state.

FastAPI runs a plain `def` dependency in a worker thread, and each hop there costs about as much CPU as a
small query. So the ones that only read `app.state` are `async def`, and database work is handed to a
thread only when there is some: a polled route that reads one row (`run_in_session`) makes one hop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from anyio import CancelScope, CapacityLimiter
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.core.errors import RateLimited, Unauthorized
from api.core.rate_limit import MemoryRateLimiter
from api.core.settings import Settings
from api.core.storage import Storage
from api.routing.forwarder import Forwarder
from api.core.job_queue import EnqueueJob
from api.services.keys import DefaultOrganization, Principal, authenticate, usable_key

T = TypeVar("T")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request, built here (that does no I/O: a connection is checked out on first use, in
    the route's worker thread) and closed after the response.

    Closing a session that still holds a connection rolls it back and returns it to the pool, which is I/O,
    so that runs in a worker thread too: shielded, so a client that leaves cannot leak the connection, and
    outside the threadpool's limit, as FastAPI does for its own generator dependencies, so a full threadpool
    whose requests all wait for a pooled connection cannot keep the ones returning it from running.
    """
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        if session.in_transaction():
            with CancelScope(shield=True):
                await anyio.to_thread.run_sync(session.close, limiter=CapacityLimiter(1))
        else:
            session.close()  # nothing to hand back: no I/O


async def run_in_session(session: Session, work: Callable[..., T], *args: Any) -> T:
    """`work(session, *args)` in a worker thread, closing the session there once it returns: a route that
    builds its whole answer in `work` makes one hop for its database work, not a second one to close."""

    def run() -> T:
        try:
            return work(session, *args)
        finally:
            session.close()

    return await run_in_threadpool(run)


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_dispatch(request: Request) -> EnqueueJob:
    return request.app.state.dispatch


async def get_forwarder(request: Request) -> Forwarder:
    return request.app.state.forwarder


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
DispatchDep = Annotated[EnqueueJob, Depends(get_dispatch)]
ForwarderDep = Annotated[Forwarder, Depends(get_forwarder)]

# Declared for the OpenAPI "Authorize" button; the check itself is below.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key from `svfit keys create --org NAME`.")


async def get_principal(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    """The organization (and key) the request acts as.

    A key is looked up in the database on every request (a worker thread); no key means the default
    organization, whose id is read once per process.
    """
    header = request.headers.get("authorization")
    # `Bearer ` with an empty key (what clients send when their key variable is unset) is no key at all.
    if credentials is None and header and header.strip().lower() != "bearer":
        raise Unauthorized("The Authorization header must be 'Bearer <key>'.")
    key = usable_key(credentials.credentials if credentials else None, auth_required=settings.auth_required)
    if key is not None:
        return await run_in_threadpool(authenticate, session, key)
    default_org: DefaultOrganization = request.app.state.default_org
    return Principal(default_org.known_id or await run_in_threadpool(default_org.resolve, session))


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_current_org(principal: PrincipalDep) -> str:
    """The id of the organization the request acts as."""
    return principal.org_id


CurrentOrg = Annotated[str, Depends(get_current_org)]


def rate_limited(action: str) -> Any:
    """A route dependency that takes one token from the caller's `action` bucket, or answers 429.

    The limit is `settings.rate_limit_{action}_per_minute`, read per request so a test can change it.
    Runs after authentication (it needs the key), so a bad key is a 401, never a 429.
    """

    async def take_token(request: Request, principal: PrincipalDep, settings: SettingsDep) -> None:
        per_minute = getattr(settings, f"rate_limit_{action}_per_minute")
        if per_minute <= 0:
            return
        limiter = request.app.state.rate_limiter
        bucket = f"{action}:{principal.rate_limit_key}"
        # An in-memory bucket is a few arithmetic operations: no worker-thread hop (a hop costs more than it).
        if isinstance(limiter, MemoryRateLimiter):
            wait = limiter.acquire(bucket, per_minute)
        else:
            wait = await run_in_threadpool(limiter.acquire, bucket, per_minute)
        if wait > 0:
            raise RateLimited(
                f"Rate limit reached for {action}: {per_minute} requests per minute per API key. "
                f"Try again in {wait:.1f}s.",
                retry_after_s=wait,
            )

    return Depends(take_token)


UploadRateLimit = rate_limited("uploads")
JobRateLimit = rate_limited("jobs")
InferenceRateLimit = rate_limited("inference")
