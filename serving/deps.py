"""A replica's request dependencies as `Annotated` aliases: the engine, the served models, the settings (all
from `app.state`, set once by `create_serving_app`), and the shared-token check every route but /health runs.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from api.core.errors import Unauthorized
from api.core.settings import Settings
from serving.engine import InferenceEngine
from serving.served_models import ServedModels


async def get_engine(request: Request) -> InferenceEngine:
    return request.app.state.inference


async def get_served_models(request: Request) -> ServedModels:
    return request.app.state.served_models


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def require_serving_token(request: Request) -> None:
    """Only the API (or an operator holding SVFIT_SERVING_TOKEN) may call a replica: it trusts the model
    names it is given, so organisation isolation is the API's job and nobody else may reach past it."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    expected = request.app.state.settings.serving_token or ""
    if scheme.lower() != "bearer" or not expected or not secrets.compare_digest(token.strip(), expected):
        raise Unauthorized("This serving replica requires 'Authorization: Bearer <SVFIT_SERVING_TOKEN>'.")


EngineDep = Annotated[InferenceEngine, Depends(get_engine)]
ServedModelsDep = Annotated[ServedModels, Depends(get_served_models)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ServingToken = Depends(require_serving_token)
