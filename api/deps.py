"""Request dependencies as `Annotated` aliases, so route signatures read like prose.

Everything comes from `app.state`, set once by `create_app()`: one settings object, one engine and
session factory, one store, the job dispatcher, the inference engine and the rate limiter. Nothing here
reads global state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.core.errors import RateLimited, Unauthorized
from api.core.settings import Settings
from api.core.storage import LocalStorage
from api.inference.engine import InferenceEngine
from api.services.jobs import Dispatch
from api.services.keys import Principal, authenticate


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


def get_storage(request: Request) -> LocalStorage:
    return request.app.state.storage


def get_dispatch(request: Request) -> Dispatch:
    return request.app.state.dispatch


def get_inference(request: Request) -> InferenceEngine:
    return request.app.state.inference


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[LocalStorage, Depends(get_storage)]
DispatchDep = Annotated[Dispatch, Depends(get_dispatch)]
InferenceDep = Annotated[InferenceEngine, Depends(get_inference)]

# Declared for the OpenAPI "Authorize" button; the check itself is below.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key from `svfit keys create --org NAME`.")


def get_principal(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    """The organization (and key) the request acts as."""
    if credentials is None and request.headers.get("authorization"):
        raise Unauthorized("The Authorization header must be 'Bearer <key>'.")
    return authenticate(
        session,
        credentials.credentials if credentials else None,
        auth_required=settings.auth_required,
        default_org=settings.default_org,
    )


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_current_org(principal: PrincipalDep) -> str:
    """The id of the organization the request acts as."""
    return principal.org_id


CurrentOrg = Annotated[str, Depends(get_current_org)]


def rate_limited(action: str) -> Any:
    """A route dependency that takes one token from the caller's `action` bucket, or answers 429.

    The limit is `settings.rate_limit_{action}_per_minute`, read per request so a test can change it.
    Runs after authentication (it needs the key), so a bad key is a 401, never a 429.
    """

    def take_token(request: Request, principal: PrincipalDep, settings: SettingsDep) -> None:
        per_minute = getattr(settings, f"rate_limit_{action}_per_minute")
        if per_minute <= 0:
            return
        wait = request.app.state.rate_limiter.acquire(f"{action}:{principal.rate_limit_key}", per_minute)
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
