"""Request dependencies as `Annotated` aliases, so route signatures read like prose.

Everything comes from `app.state`, set once by `create_app()`: one settings object, one engine and
session factory, one store, the job dispatcher and the inference engine. Nothing here reads global state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.core.errors import Unauthorized
from api.core.settings import Settings
from api.core.storage import LocalStorage
from api.inference.engine import InferenceEngine
from api.services.jobs import Dispatch
from api.services.keys import authenticate


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


def get_current_org(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> str:
    """The id of the organization the request acts as."""
    if credentials is None and request.headers.get("authorization"):
        raise Unauthorized("The Authorization header must be 'Bearer <key>'.")
    return authenticate(
        session,
        credentials.credentials if credentials else None,
        auth_required=settings.auth_required,
        default_org=settings.default_org,
    )


CurrentOrg = Annotated[str, Depends(get_current_org)]
