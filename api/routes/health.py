"""Liveness (the process answers) and readiness (the database answers) probes; readiness also counts the live
serving replicas, so an operator sees at a glance whether inference can be answered (none is not unready:
files and jobs still work)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from api.core.errors import ServiceUnavailable
from api.core.replicas import live_replicas
from api.deps import SessionDep, SettingsDep, run_in_session

router = APIRouter(tags=["health"])


# `async def`: nothing to wait for, so no worker-thread hop (a probe should cost the server next to nothing).
@router.get("/healthz")
async def liveness() -> dict[str, str]:
    return {"status": "ok"}


def _ping(session: Session, ttl_s: float) -> dict[str, str | int]:
    try:
        session.execute(text("SELECT 1"))
        replicas = len(live_replicas(session, ttl_s))
    except SQLAlchemyError as exc:
        raise ServiceUnavailable("The database is not reachable.") from exc
    return {"status": "ok", "serving_replicas": replicas}


@router.get("/readyz")
async def readiness(session: SessionDep, settings: SettingsDep) -> dict[str, str | int]:
    return await run_in_session(session, _ping, settings.serving_replica_ttl_s)
