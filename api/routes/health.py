"""Liveness (the process answers) and readiness (the database answers) probes."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from api.core.errors import ServiceUnavailable
from api.deps import SessionDep, run_in_session

router = APIRouter(tags=["health"])


# `async def`: nothing to wait for, so no worker-thread hop (a probe should cost the server next to nothing).
@router.get("/healthz")
async def liveness() -> dict[str, str]:
    return {"status": "ok"}


def _ping(session: Session) -> dict[str, str]:
    try:
        session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise ServiceUnavailable("The database is not reachable.") from exc
    return {"status": "ok"}


@router.get("/readyz")
async def readiness(session: SessionDep) -> dict[str, str]:
    return await run_in_session(session, _ping)
