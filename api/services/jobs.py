"""Fine-tuning jobs: creation (validated, resolved, idempotent, enqueued after commit), reads, and the
cancel / pause / resume transitions.

The job row is the source of truth and the worker changes it concurrently, so every transition here is
a conditional UPDATE (`... WHERE status IN (...)`) that either applies or tells us to re-read. A job
that is running is never stopped from here: we set `requested_action` and the worker acts on it within
a step, then writes the final status itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Text, bindparam, case, cast, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from api.core.base_checkpoints import largest_matrix_rank, resolve_base_model
from api.core.errors import (
    InvalidParameter,
    InvalidRequest,
    InvalidStateTransition,
    InvalidTrainingFile,
    NotFound,
    ServiceUnavailable,
)
from api.core.job_spec import (
    TRAIN_OPTIONS,
    check_file_fits_method,
    check_method_type,
    resolve_request,
    stored_method,
)
from api.core.lineage import starting_fine_tune
from api.core.ids import new_id
from api.core.job_queue import EnqueueJob
from api.core.job_states import CANCELLABLE_AT_ONCE, PAUSABLE_AT_ONCE, TERMINAL, JobStatus
from api.core.settings import Settings
from api.core.tables import Checkpoint, FineTunedModel, Job, JobEvent, now
from api.schemas import JobCreate
from api.services.files import usable_training_file
from api.services.graders import check_job_grader_models
from api.services.pagination import Page, paginate

logger = logging.getLogger(__name__)

# The suffix becomes one ':'-separated field of `ft:{base}:{org}:{suffix}:{id}`.
SUFFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
# Transitions retry this many times when the worker moves the job between our read and our update.
TRANSITION_ATTEMPTS = 5


# --- creation ------------------------------------------------------------------------------------------


def request_hash(request: JobCreate) -> str:
    canonical = json.dumps(request.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _method_type(request: JobCreate) -> str:
    """The request's `method.type` (supervised when it sends no method), if this service trains it."""
    if request.method is None:
        return "supervised"
    reinforcement = request.method.reinforcement
    return check_method_type(request.method.type, reinforcement.model_dump() if reinforcement else None)


def _grader(request: JobCreate) -> dict[str, Any] | None:
    """A reinforcement job's grader, as the request gave it (checked by `_method_type`)."""
    block = request.method.reinforcement if request.method is not None else None
    return block.grader if block is not None else None


def _requested_hyperparameters(request: JobCreate, method_type: str) -> tuple[dict[str, Any], str]:
    """The hyperparameters asked for, from the legacy field or the `method` block, and where they came from."""
    legacy = request.hyperparameters.model_dump(exclude_unset=True) if request.hyperparameters else {}
    block = getattr(request.method, method_type, None) if request.method else None
    from_method = block.hyperparameters.model_dump(exclude_unset=True) if block and block.hyperparameters else {}
    for name in legacy.keys() & from_method.keys():
        if legacy[name] != from_method[name]:
            raise InvalidParameter(
                f"'{name}' is given twice with different values (hyperparameters and method.{method_type}).",
                param=f"hyperparameters.{name}",
            )
    if from_method:
        return {**legacy, **from_method}, f"method.{method_type}.hyperparameters"
    return legacy, "hyperparameters"


def _check_suffix_and_metadata(request: JobCreate) -> None:
    if request.suffix is not None and not SUFFIX_PATTERN.match(request.suffix):
        raise InvalidParameter(
            "'suffix' must be 1 to 64 characters from letters, digits, '-', '_' and '.'.", param="suffix"
        )
    metadata = request.metadata or {}
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidParameter(f"'metadata' holds at most {MAX_METADATA_PAIRS} pairs.", param="metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise InvalidParameter(
                f"metadata keys are at most {MAX_METADATA_KEY} characters and values {MAX_METADATA_VALUE}.",
                param=f"metadata.{key}",
            )


def _continued_peft(session: Session, starting: FineTunedModel, requested: dict[str, Any]) -> dict[str, Any]:
    """A continued fine-tune's `peft`: the method and spec of the fine-tune it continues (its weights are in that
    shape), with the training options the request sets. A request asking for another method or spec is a 400."""
    parent = session.scalar(select(Job.peft).where(Job.id == starting.job_id)) or {}
    shape = {k: v for k, v in parent.items() if k not in TRAIN_OPTIONS}
    for name, value in requested.items():
        if name in TRAIN_OPTIONS or value is None or shape.get(name) == value:
            continue
        raise InvalidParameter(
            f"'{starting.id}' is a {shape.get('type')} fine-tune, and continuing it keeps its method and spec "
            f"({', '.join(f'{k}={v}' for k, v in shape.items())}): 'peft.{name}' cannot be {value!r}. Only "
            "training options (max_seq_length, checkpoint_every, ...) may change.",
            param=f"peft.{name}",
        )
    return {**shape, **{k: v for k, v in requested.items() if k in TRAIN_OPTIONS and v is not None}}


def _check_rank_fits(peft: dict[str, Any], base_model_path: Path, model: str) -> None:
    """A rank above every matrix's min(m, n) is a mistake worth a 400 now, not a silent cap in training.

    Only the model width is checked (it bounds every matrix, see largest_matrix_rank). Whether
    `target_modules` match anything needs the model's module tree, which costs seconds of loading: the
    worker checks that and fails the job with the training library's TargetModulesNotFoundError message.
    """
    rank = peft.get("rank")
    largest = largest_matrix_rank(base_model_path) if rank is not None else None
    if largest is not None and rank > largest:
        raise InvalidParameter(
            f"'peft.rank' is {rank}, but no weight matrix of '{model}' has a rank above {largest} (its width).",
            param="peft.rank",
        )


def _existing_job(session: Session, settings: Settings, org_id: str, idempotency_key: str | None, body_hash: str) -> Job | None:
    if idempotency_key is not None:
        job = session.scalar(select(Job).where(Job.org_id == org_id, Job.idempotency_key == idempotency_key))
        if job is not None and job.request_hash != body_hash:
            raise InvalidRequest(
                "This Idempotency-Key was already used with a different request body.",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        return job
    # No key: the client's automatic retry of a request whose response was lost sends the same body.
    # A cancelled job is not handed back: re-submitting after a cancel means "run it again".
    return session.scalar(
        select(Job)
        .where(
            Job.org_id == org_id,
            Job.request_hash == body_hash,
            Job.idempotency_key.is_(None),
            Job.created_at >= now() - settings.job_dedupe_window_s,
            Job.status != JobStatus.CANCELLED,
        )
        .order_by(Job.pk.desc())
        .limit(1)
    )


def create_job(
    session: Session,
    settings: Settings,
    *,
    org_id: str,
    request: JobCreate,
    idempotency_key: str | None,
    dispatch: EnqueueJob,
) -> Job:
    """Validate and resolve the request, commit the job as `queued`, then hand its id to the queue.

    Files were validated at upload, so there is nothing left for a `validating_files` phase to do.
    """
    body_hash = request_hash(request)
    existing = _existing_job(session, settings, org_id, idempotency_key, body_hash)
    if existing is not None:
        return existing

    starting = starting_fine_tune(session, org_id, request.model)
    base_model_path = resolve_base_model(starting.parent if starting else request.model, settings.models_dir)
    method_type = _method_type(request)
    training = usable_training_file(
        session, org_id, request.training_file, param="training_file", min_examples=settings.min_training_examples
    )
    check_file_fits_method(method_type, training.data_format, training.id, param="training_file")
    if request.validation_file is not None:
        validation = usable_training_file(session, org_id, request.validation_file, param="validation_file")
        check_file_fits_method(method_type, validation.data_format, validation.id, param="validation_file")
        if validation.data_format != training.data_format:
            raise InvalidTrainingFile(
                f"The validation file holds {validation.data_format} examples but the training file "
                f"{training.data_format} examples.",
                param="validation_file",
            )
    _check_suffix_and_metadata(request)
    if method_type == "reinforcement":
        check_job_grader_models(session, settings, org_id, _grader(request))
    requested, param_prefix = _requested_hyperparameters(request, method_type)
    requested_peft = request.peft.model_dump() if request.peft else None
    if starting is not None:
        requested_peft = _continued_peft(session, starting, requested_peft or {})
    peft, hyperparameters = resolve_request(
        requested_peft,
        requested,
        n_examples=training.num_examples or 0,
        param_prefix=param_prefix,
        method_type=method_type,
    )
    # Only a rank the request named: the default (SVFit's 256) is "at most", clamped to each matrix's k.
    if starting is None:
        _check_rank_fits(request.peft.model_dump() if request.peft else {}, base_model_path, request.model)

    job = Job(
        id=new_id("ftjob"),
        org_id=org_id,
        model=request.model,
        training_file=training.id,
        validation_file=request.validation_file,
        suffix=request.suffix,
        seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
        user_metadata=request.metadata,
        hyperparameters=hyperparameters,
        method=stored_method(method_type, hyperparameters, _grader(request)),
        peft=peft,
        status=JobStatus.QUEUED,
        result_files=[],
        idempotency_key=idempotency_key,
        request_hash=body_hash,
    )
    session.add(job)
    session.add(_event(job.id, f"Created fine-tuning job: {job.id}"))
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the insert; answer with its job.
        session.rollback()
        winner = _existing_job(session, settings, org_id, idempotency_key, body_hash) if idempotency_key else None
        if winner is None:
            raise
        return winner

    try:
        dispatch(job.id)
    except Exception as exc:
        # Not enqueued means never run: withdraw the job so the client's retry (503 is retried) starts clean.
        logger.exception("could not enqueue job %s", job.id)
        session.delete(job)
        session.commit()
        raise ServiceUnavailable("The job queue is unavailable; the job was not created. Try again.") from exc
    return job


# --- reads ---------------------------------------------------------------------------------------------

# A job's 1-based position among all queued jobs (every organization shares the workers): one correlated
# count over the (status, pk) index, computed in the query that reads the job.
_ahead = aliased(Job)
QUEUE_POSITION = select(func.count() + 1).where(_ahead.status == JobStatus.QUEUED, _ahead.pk < Job.pk).scalar_subquery()

# Built once, at import: building a select costs about as much CPU as running it from SQLAlchemy's cache
# of compiled statements, and every client that follows a job reads it once or twice a second.
_JOB_BY_ID = select(Job).where(Job.id == bindparam("job_id"), Job.org_id == bindparam("org_id"))
_JOB_AND_POSITION_BY_ID = _JOB_BY_ID.add_columns(case((Job.status == JobStatus.QUEUED, QUEUE_POSITION), else_=None))


def get_job(session: Session, org_id: str, job_id: str) -> Job:
    job = session.scalar(_JOB_BY_ID, {"job_id": job_id, "org_id": org_id})
    if job is None:
        raise NotFound(f"No such fine-tuning job: {job_id}")
    return job


def get_job_and_queue_position(session: Session, org_id: str, job_id: str) -> tuple[Job, int | None]:
    """The job (as `get_job`) and its queue position (None unless it is queued), in one query."""
    row = session.execute(_JOB_AND_POSITION_BY_ID, {"job_id": job_id, "org_id": org_id}).first()
    if row is None:
        raise NotFound(f"No such fine-tuning job: {job_id}")
    return row[0], row[1]


@dataclass(frozen=True)
class MetadataFilter:
    """Which jobs a list keeps by their metadata: those holding every (key, value) pair, or, with
    ``without_metadata``, those created without any."""

    pairs: tuple[tuple[str, str], ...] = ()
    without_metadata: bool = False


METADATA_QUERY_KEY = re.compile(r"metadata\[(.*)\]", re.DOTALL)


def metadata_filter(query: Iterable[tuple[str, str]]) -> MetadataFilter | None:
    """OpenAI's list filter from the query string: ``metadata[k]=v`` (repeatable) or ``metadata=null``.
    None when the query holds neither."""
    pairs: dict[str, str] = {}
    without = False
    for name, value in query:
        if name == "metadata":
            if value != "null":
                raise InvalidParameter("Filter by metadata with 'metadata[key]=value' or 'metadata=null'.",
                                       param="metadata")
            without = True
        elif match := METADATA_QUERY_KEY.fullmatch(name):
            pairs[match.group(1)] = value
    if without and pairs:
        raise InvalidParameter("Use either 'metadata[key]=value' or 'metadata=null', not both.", param="metadata")
    if len(pairs) > MAX_METADATA_PAIRS:
        raise InvalidParameter(f"A metadata filter holds at most {MAX_METADATA_PAIRS} pairs.", param="metadata")
    if not without and not pairs:
        return None
    return MetadataFilter(tuple(pairs.items()), without)


def list_jobs(
    session: Session, org_id: str, *, after: str | None, limit: int, metadata: MetadataFilter | None = None
) -> Page[Job]:
    filters = [Job.org_id == org_id]
    if metadata is not None:
        if metadata.without_metadata:
            # Stored as SQL NULL, JSON null or {} depending on how the job was created: all read as none.
            filters.append(func.coalesce(cast(Job.user_metadata, Text), "null").in_(("null", "{}")))
        filters.extend(Job.user_metadata[key].as_string() == value for key, value in metadata.pairs)
    return paginate(session, Job, *filters, after=after, limit=limit, order="desc")


def queue_positions(session: Session, jobs: Iterable[Job]) -> dict[str, int]:
    """Queue positions of those of `jobs` that read as queued, in one query (a page of jobs: one, not one each)."""
    queued = [job.id for job in jobs if job.status == JobStatus.QUEUED]
    if not queued:
        return {}
    rows = session.execute(select(Job.id, QUEUE_POSITION).where(Job.id.in_(queued)))
    return {job_id: position for job_id, position in rows}


def list_events(session: Session, org_id: str, job_id: str, *, after: str | None, limit: int) -> Page[JobEvent]:
    job = get_job(session, org_id, job_id)
    return paginate(session, JobEvent, JobEvent.job_id == job.id, after=after, limit=limit, order="desc")


def list_checkpoints(session: Session, org_id: str, job_id: str, *, after: str | None, limit: int) -> Page[Checkpoint]:
    job = get_job(session, org_id, job_id)
    return paginate(session, Checkpoint, Checkpoint.job_id == job.id, after=after, limit=limit, order="desc")


# --- transitions ---------------------------------------------------------------------------------------


def _event(job_id: str, message: str, level: str = "info") -> JobEvent:
    return JobEvent(id=new_id("ftevent"), job_id=job_id, level=level, type="message", message=message)


def _apply(session: Session, job: Job, *conditions: Any, event: str | None = None, **values: Any) -> bool:
    """UPDATE the job WHERE `conditions` hold; commit, refresh, and tell whether it applied."""
    applied = session.execute(update(Job).where(Job.id == job.id, *conditions).values(**values)).rowcount == 1
    if applied and event:
        session.add(_event(job.id, event))
    session.commit()
    session.refresh(job)
    return applied


def _refuse_if_finished(job: Job, refused: str) -> None:
    """`refused` ends the message: what a finished job cannot do ("be paused")."""
    if job.status in TERMINAL:
        raise InvalidStateTransition(f"Job {job.id} has already {job.status} and cannot {refused}.")


def cancel_job(session: Session, org_id: str, job_id: str) -> Job:
    job = get_job(session, org_id, job_id)
    for _ in range(TRANSITION_ATTEMPTS):
        _refuse_if_finished(job, "be cancelled")
        if job.status == JobStatus.RUNNING:
            if job.requested_action == "cancel":
                return job
            if _apply(
                session, job, Job.status == JobStatus.RUNNING,
                event="Cancellation requested.", requested_action="cancel",
            ):
                return job
        elif _apply(
            session,
            job,
            Job.status.in_(CANCELLABLE_AT_ONCE),
            event="Job cancelled.",
            status=JobStatus.CANCELLED,
            requested_action=None,
            finished_at=now(),
            estimated_finish=None,
        ):
            return job
    raise ServiceUnavailable(f"Job {job_id} kept changing state; try again.")


def pause_job(session: Session, org_id: str, job_id: str) -> Job:
    """Running: ask the worker to checkpoint and stop. Queued: park it before a worker takes it."""
    job = get_job(session, org_id, job_id)
    for _ in range(TRANSITION_ATTEMPTS):
        _refuse_if_finished(job, "be paused")
        if job.status == JobStatus.PAUSED or (job.status == JobStatus.RUNNING and job.requested_action == "pause"):
            return job
        if job.status == JobStatus.RUNNING:
            if job.requested_action == "cancel":
                raise InvalidStateTransition(f"Job {job.id} is being cancelled and cannot be paused.")
            if _apply(
                session, job, Job.status == JobStatus.RUNNING, Job.requested_action.is_(None),
                event="Pause requested.", requested_action="pause",
            ):
                return job
        elif _apply(
            session, job, Job.status.in_(PAUSABLE_AT_ONCE), event="Job paused.", status=JobStatus.PAUSED
        ):
            return job
    raise ServiceUnavailable(f"Job {job_id} kept changing state; try again.")


def resume_job(session: Session, org_id: str, job_id: str, *, dispatch: EnqueueJob) -> Job:
    """Paused: back to `queued` and enqueued again (the worker resumes from the last checkpoint).

    Running with a pause not yet acted on: the pause is withdrawn. Queued or running: nothing to do.
    """
    job = get_job(session, org_id, job_id)
    for _ in range(TRANSITION_ATTEMPTS):
        _refuse_if_finished(job, "be resumed")
        if job.status == JobStatus.RUNNING:
            if job.requested_action != "pause" or _apply(
                session, job, Job.status == JobStatus.RUNNING, Job.requested_action == "pause",
                event="Pause withdrawn.", requested_action=None,
            ):
                return job
        elif job.status != JobStatus.PAUSED:
            return job
        elif _apply(
            session, job, Job.status == JobStatus.PAUSED, event="Job resumed.", status=JobStatus.QUEUED,
            requested_action=None,
        ):
            try:
                dispatch(job.id)
            except Exception as exc:
                logger.exception("could not enqueue resumed job %s", job.id)
                _apply(session, job, Job.status == JobStatus.QUEUED, status=JobStatus.PAUSED)
                raise ServiceUnavailable("The job queue is unavailable; the job stays paused. Try again.") from exc
            return job
    raise ServiceUnavailable(f"Job {job_id} kept changing state; try again.")
