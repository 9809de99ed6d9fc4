"""`/v1/fine_tuning/jobs`: create, list, retrieve, cancel / pause / resume, events, checkpoints, artifacts.

Clients poll the read routes (the CLI and the dashboard follow a job through its retrieve, events and
checkpoints routes every second or so). Those are `async def` and do their database work, closing the
session, in one worker-thread hop (`run_in_session`); a plain `def` route makes two more, one to validate
its response (FastAPI does so for sync endpoints) and one to close the session, and each costs about as
much CPU as the query. The writes and the artifact download stay plain `def`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from api.core.settings import DEFAULT_SERVING_LORA_RANK, MAX_SERVING_LORA_RANK
from api.core.tables import Job
from api.deps import CurrentOrg, DispatchDep, JobRateLimit, SessionDep, SettingsDep, StorageDep, run_in_session
from api.schemas import CheckpointPublic, CheckpointsPublic, JobCreate, JobEventPublic, JobEventsPublic, JobPublic, JobsPublic
from api.services import artifacts as artifacts_service
from api.services import jobs as jobs_service

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])

Limit = Annotated[int, Query(ge=1, le=100)]
MAX_STEP = 2**31 - 1  # checkpoints.step_number is a 32-bit INTEGER


def _public(session: Session, jobs: list[Job]) -> list[JobPublic]:
    positions = jobs_service.queue_positions(session, jobs)
    return [JobPublic.from_row(job, positions.get(job.id)) for job in jobs]


@router.post("", dependencies=[JobRateLimit])
def create_job(
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    org_id: CurrentOrg,
    dispatch: DispatchDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=256)] = None,
) -> JobPublic:
    job = jobs_service.create_job(
        session, settings, org_id=org_id, request=body, idempotency_key=idempotency_key, dispatch=dispatch
    )
    return _public(session, [job])[0]


def _list(
    session: Session, org_id: str, after: str | None, limit: int, metadata: jobs_service.MetadataFilter | None
) -> JobsPublic:
    page = jobs_service.list_jobs(session, org_id, after=after, limit=limit, metadata=metadata)
    return JobsPublic.of(_public(session, page.items), page.has_more)


@router.get("")
async def list_jobs(
    request: Request, session: SessionDep, org_id: CurrentOrg, after: str | None = None, limit: Limit = 20
) -> JobsPublic:
    """Newest first. Filter by metadata with `metadata[key]=value` (repeatable: every pair must match) or
    `metadata=null` (jobs created without metadata)."""
    metadata = jobs_service.metadata_filter(request.query_params.multi_items())
    return await run_in_session(session, _list, org_id, after, limit, metadata)


def _retrieve(session: Session, org_id: str, job_id: str) -> JobPublic:
    return JobPublic.from_row(*jobs_service.get_job_and_queue_position(session, org_id, job_id))


@router.get("/{job_id}")
async def retrieve_job(session: SessionDep, org_id: CurrentOrg, job_id: str) -> JobPublic:
    return await run_in_session(session, _retrieve, org_id, job_id)


@router.post("/{job_id}/cancel")
def cancel_job(session: SessionDep, org_id: CurrentOrg, job_id: str) -> JobPublic:
    return _public(session, [jobs_service.cancel_job(session, org_id, job_id)])[0]


@router.post("/{job_id}/pause")
def pause_job(session: SessionDep, org_id: CurrentOrg, job_id: str) -> JobPublic:
    return _public(session, [jobs_service.pause_job(session, org_id, job_id)])[0]


@router.post("/{job_id}/resume")
def resume_job(session: SessionDep, org_id: CurrentOrg, dispatch: DispatchDep, job_id: str) -> JobPublic:
    return _public(session, [jobs_service.resume_job(session, org_id, job_id, dispatch=dispatch)])[0]


def _events(session: Session, org_id: str, job_id: str, after: str | None, limit: int) -> JobEventsPublic:
    page = jobs_service.list_events(session, org_id, job_id, after=after, limit=limit)
    return JobEventsPublic.of([JobEventPublic.from_row(e) for e in page.items], page.has_more)


@router.get("/{job_id}/events")
async def list_job_events(
    session: SessionDep, org_id: CurrentOrg, job_id: str, after: str | None = None, limit: Limit = 20
) -> JobEventsPublic:
    return await run_in_session(session, _events, org_id, job_id, after, limit)


def _checkpoints(session: Session, org_id: str, job_id: str, after: str | None, limit: int) -> CheckpointsPublic:
    page = jobs_service.list_checkpoints(session, org_id, job_id, after=after, limit=limit)
    return CheckpointsPublic.of([CheckpointPublic.from_row(c) for c in page.items], page.has_more)


@router.get("/{job_id}/checkpoints")
async def list_job_checkpoints(
    session: SessionDep, org_id: CurrentOrg, job_id: str, after: str | None = None, limit: Limit = 10
) -> CheckpointsPublic:
    return await run_in_session(session, _checkpoints, org_id, job_id, after, limit)


# A plain `def`: the first request for an archive exports (and may merge) a model, which takes seconds
# to minutes; FastAPI runs it in a worker thread, off the event loop.
@router.get("/{job_id}/artifacts", response_class=FileResponse)
def download_job_artifact(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    org_id: CurrentOrg,
    job_id: str,
    artifact_format: Annotated[Literal["svfit", "peft_lora", "merged"], Query(alias="format")] = "svfit",
    # Bounded by the column type: a larger integer cannot be a step, and the database would refuse it.
    step: Annotated[
        int | None, Query(ge=0, le=MAX_STEP, description="A checkpoint's step; default: the final adapter.")
    ] = None,
    rank: Annotated[
        int | None,
        Query(
            ge=1,
            le=MAX_SERVING_LORA_RANK,
            description=f"`peft_lora` only: the LoRA rank (default SVFIT_SERVING_LORA_RANK, "
            f"{DEFAULT_SERVING_LORA_RANK}); an update of higher rank is cut to its best approximation of this rank.",
        ),
    ] = None,
    include_basis: Annotated[
        bool,
        Query(description="`svfit` only: put U, V and s in the adapter (self-contained). By default it holds σ "
              "and the keys of its bases, and loads anywhere by recomputing the SVD of the base."),
    ] = False,
) -> FileResponse:
    archive = artifacts_service.artifact_archive(
        session, storage, settings, org_id=org_id, job_id=job_id, fmt=artifact_format, step=step, rank=rank,
        include_basis=include_basis,
    )
    headers = {"X-Content-SHA256": archive.sha256}
    if archive.kept_energy is not None:
        headers["X-Kept-Energy"] = f"{archive.kept_energy:.4f}"
    return FileResponse(archive.path, media_type="application/gzip", filename=archive.filename, headers=headers)
