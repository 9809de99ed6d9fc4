"""`/v1/fine_tuning/alpha/graders`: OpenAI's `validate` and `run` (api/services/graders.py over the graders
library).

Same key, error envelope and body cap as every route, and the inference rate limit (a run asks models). A bad
grader is a 400 naming the field's full path with the library's code (`grader_not_supported` for python). A
model grader's `model` is resolved as an inference request's is: a base model a replica serves or one of the
organization's own fine-tunes; anything else (another organization's included) is a 400 `model_not_found`
naming that field (`grader.graders.judge.model`). Grading blocks, so it runs on threads of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import APIRouter, Request
from sqlalchemy.orm import Session

from api.core.errors import ModelNotFound, UnknownModel
from api.deps import CurrentOrg, ForwarderDep, InferenceRateLimit, SessionDep, run_in_session
from api.routing.forwarder import Forwarder
from api.core.route_targets import RouteTarget, base_target
from api.schemas import GraderRunPublic, GraderRunRequest, GraderValidatePublic, GraderValidateRequest
from api.services import graders as graders_service
from graders import CompiledGrader

T = TypeVar("T")

router = APIRouter(prefix="/fine_tuning/alpha/graders", tags=["graders"], dependencies=[InferenceRateLimit])

# Gradings at once per API process. Their own threads: a grading thread waits on model calls whose routing
# needs the default threadpool (the replica registry is read there), so sharing that pool could deadlock it.
GRADING_THREADS = 8


async def _in_grading_thread(request: Request, work: Callable[..., T], *args: Any) -> T:
    state = request.app.state
    limiter = getattr(state, "grading_limiter", None)
    if limiter is None:
        limiter = state.grading_limiter = CapacityLimiter(GRADING_THREADS)
    return await anyio.to_thread.run_sync(work, *args, limiter=limiter)


async def _model_targets(
    compiled: CompiledGrader, session: Session, org_id: str, forwarder: Forwarder
) -> dict[str, RouteTarget]:
    """Each model the grader names, resolved for the organization; a 400 `model_not_found` naming the `model`
    field of one that no replica serves (503 when no replica runs at all, as inference answers)."""
    fields = compiled.model_fields()
    fine_tunes = {model for model in fields.values() if base_target(model) is None}
    resolved = {}
    if fine_tunes:  # a base model's id needs no database read
        resolved = await run_in_session(session, graders_service.fine_tune_targets, org_id, fine_tunes)
    targets: dict[str, RouteTarget] = {}
    for param, model in fields.items():
        target = base_target(model) or resolved[model]
        try:
            await forwarder.check_servable(target)
        except UnknownModel as exc:
            raise ModelNotFound(exc.message, param=param) from exc
        targets[model] = target
    return targets


@router.post("/validate")
async def validate_grader(
    body: GraderValidateRequest, request: Request, session: SessionDep, org_id: CurrentOrg, forwarder: ForwarderDep
) -> GraderValidatePublic:
    """The grader back if it can run: its fields, and the models its model graders name."""
    compiled = await _in_grading_thread(request, graders_service.compile_checked, body.grader)
    await _model_targets(compiled, session, org_id, forwarder)
    return GraderValidatePublic(grader=body.grader)


@router.post("/run")
async def run_grader(
    body: GraderRunRequest, request: Request, session: SessionDep, org_id: CurrentOrg, forwarder: ForwarderDep
) -> GraderRunPublic:
    """Grade `model_sample` for dataset row `item`. A sample that cannot be graded gets reward 0 and its flag
    in `metadata.errors` (`metadata.error_details` says which grader and why)."""
    compiled = await _in_grading_thread(request, graders_service.compile_checked, body.grader)
    models = graders_service.HostedModels(forwarder, await _model_targets(compiled, session, org_id, forwarder))
    run_body = {"grader": body.grader, "model_sample": body.model_sample, "item": body.item}
    return await _in_grading_thread(request, graders_service.run_checked, run_body, models.complete)
