"""One fine-tuning job, run as plain functions: claim the row, train with reporting callbacks, then publish,
pause, cancel, re-queue or fail. Callable without Celery (tests and tools call `run_job` directly).

State changes are conditional updates on the job row (`queued → running` only while queued; every later
write only while this worker still holds it), so duplicate messages, racing workers and a reaper that took
the job away all resolve to exactly one worker training it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from api.core.base_checkpoints import resolve_base_model
from api.core.basis_store import StoredBases
from api.core.db import session_scope
from api.core.errors import InvalidTrainingFile, ServiceError
from api.core.job_spec import peft_spec, train_config
from api.core.job_states import TERMINAL, JobStatus
from api.core.lineage import base_model_id, starting_adapter_key
from api.core.settings import Settings, get_settings
from api.core.storage import Storage, get_storage
from api.core.tables import File, Job, now
from svfit_core.training.layout import step_of_checkpoint_dir
from worker import publishing
from worker.recovery import Heartbeat, shutdown_requested
from worker.reporting import JobLost, JobReporter, add_event, owned
from worker.rewards import GraderReward, job_reward

log = logging.getLogger(__name__)

# What `run_job` returns, for logs and tests: the job's new status, or why nothing was done.
Outcome = str


def new_worker_id() -> str:
    """Unique per attempt, so even the same process never mistakes an old claim for its own."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# --- entry point ---------------------------------------------------------------------------------------


def run_job(job_id: str, *, worker_id: str | None = None) -> Outcome:
    """Run job `job_id` to its next resting state. Safe to call for any id, any number of times."""
    worker_id = worker_id or new_worker_id()
    settings = get_settings()
    moot = _precheck(job_id, settings)
    if moot is not None:
        log.info("job %s: nothing to do (%s)", job_id, moot)
        return moot
    if not claim_job(job_id, worker_id):
        log.info("job %s: claimed by another worker", job_id)
        return "skipped"
    log.info("job %s: running as %s", job_id, worker_id)
    with Heartbeat(job_id, worker_id, settings.heartbeat_interval_s) as heartbeat:
        try:
            return _train(job_id, worker_id, heartbeat, settings)
        except JobLost:
            return "lost"
        except OperationalError:
            # Transient: give the job back so the task's retry (or another worker) can claim it again and
            # resume from the last checkpoint. If even this fails, the reaper will do it.
            _release(job_id, worker_id, "Database unavailable; the job will be retried")
            raise
        except Exception as exc:  # noqa: BLE001 - every other failure is recorded on the job
            fail_job(job_id, exc, worker_id=worker_id)
            return JobStatus.FAILED


# --- state transitions ---------------------------------------------------------------------------------


def _precheck(job_id: str, settings: Settings) -> Outcome | None:
    """Why the message is moot, or None when the job should be claimed."""
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one_or_none()
        if job is None:
            return "missing"
        if job.status in TERMINAL or job.status == JobStatus.PAUSED:
            return job.status
        if job.status == JobStatus.RUNNING:
            # Held by a live worker (a re-delivered message), or by a dead one: the reaper's business.
            return "held" if (job.heartbeat_at or 0) > time.time() - settings.heartbeat_timeout_s else "stale"
    return None


def claim_job(job_id: str, worker_id: str) -> bool:
    """`queued → running` for this worker, only if still queued. Of two racing claims exactly one wins."""
    with session_scope() as session:
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.RUNNING,
                worker_id=worker_id,
                started_at=func.coalesce(Job.started_at, now()),
                attempt=Job.attempt + 1,
                heartbeat_at=time.time(),
            )
        ).rowcount
    return claimed == 1


def _release(job_id: str, worker_id: str, message: str) -> bool:
    """`running → queued` for a job this worker holds (it will resume from its last checkpoint)."""
    try:
        with session_scope() as session:
            released = session.execute(
                owned(job_id, worker_id).values(status=JobStatus.QUEUED, worker_id=None, heartbeat_at=None)
            ).rowcount
            if released:
                add_event(session, job_id, message, level="warn")
    except SQLAlchemyError:
        log.warning("could not release job %s", job_id, exc_info=True)
        return False
    return released == 1


# The library knows nothing of the request; its codes that are about one field of it name that field.
_PARAM_OF_LIBRARY_CODE = {
    "target_modules_not_found": "peft.target_modules",
    "invalid_target_modules": "peft.target_modules",
    "no_default_targets": "peft.target_modules",
    "invalid_rank": "peft.rank",
    "invalid_energy": "peft.energy",
    "invalid_energy_measure": "peft.energy_measure",
    "invalid_band": "peft.band",
    "unsupported_layer": "model",  # a quantized base: no choice of targets helps, an unquantized model does
    # The pre-flight's and the loop's device-memory error names the longest max_seq_length that fits first
    # (then a rank, fewer targets); host memory runs short loading the base, which a smaller model helps (or a
    # worker with more memory, which is no field of the request).
    "out_of_memory": "peft.max_seq_length",
    "insufficient_host_memory": "model",
    # A job asking for more GPUs than this worker process sees (one per process unless started otherwise).
    "insufficient_devices": "peft.gpus",
}


def error_for(exc: BaseException) -> tuple[str, str, str | None]:
    """(code, message, param) for a failure: stable codes and human messages, never a traceback."""
    from svfit_core.errors import DataError, SVFitError

    if isinstance(exc, ServiceError):
        return exc.code, exc.message, exc.param
    if isinstance(exc, DataError):
        details = "; ".join(exc.errors[:5])
        message = f"The training data is invalid: {exc.message}" + (f" ({details})" if details else "")
        return "invalid_training_file", message, "training_file"
    if _out_of_disk(exc):
        return (
            "insufficient_storage",
            "The job could not save its checkpoints or fine-tuned model: the worker's disk or artifact store "
            "is full. Free space on the store, then create the job again.",
            None,
        )
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        # A smaller batch_size would not help: a step runs in micro-batches that fit, with the same result.
        return (
            "out_of_memory",
            "The job ran out of memory on the worker. Try a smaller max_seq_length, a smaller rank or fewer "
            "target_modules.",
            None,
        )
    if isinstance(exc, SVFitError):
        # The library's typed errors are about the request (a rank, a target module); their codes are stable.
        return exc.code, exc.message, getattr(exc, "param", None) or _PARAM_OF_LIBRARY_CODE.get(exc.code)
    return "internal_error", "The job failed due to an internal error.", None


def _out_of_disk(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it was raised from, is a full disk (or a full quota)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def fail_job(job_id: str, exc: BaseException, *, worker_id: str | None = None) -> bool:
    """Mark the job failed with a stable error code, if it is still running (and ours)."""
    code, message, param = error_for(exc)
    if code == "internal_error":
        log.error("job %s failed", job_id, exc_info=exc)
    else:
        log.info("job %s failed: %s: %s", job_id, code, message)
    stmt = update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
    if worker_id is not None:
        stmt = stmt.where(Job.worker_id == worker_id)
    with session_scope() as session:
        failed = session.execute(
            stmt.values(
                status=JobStatus.FAILED,
                error={"code": code, "message": message, "param": param},
                finished_at=now(),
                estimated_finish=None,
                requested_action=None,
            )
        ).rowcount
        if failed:
            add_event(session, job_id, message, level="error")
    return failed == 1


# --- training ------------------------------------------------------------------------------------------


def _load_file(storage: Storage, file_id: str, param: str) -> list[dict]:
    from svfit_core.training.data import load_examples
    from svfit_core.errors import DataError

    with session_scope() as session:
        row = session.scalars(select(File).where(File.id == file_id)).one_or_none()
    if row is None or not storage.exists(row.storage_key):
        raise InvalidTrainingFile(f"File '{file_id}' is no longer available.", param=param)
    try:
        return load_examples(storage.path(row.storage_key))
    except DataError as exc:
        details = "; ".join(exc.errors[:5])
        raise InvalidTrainingFile(
            f"File '{file_id}' is invalid: {exc.message}" + (f" ({details})" if details else ""), param=param
        ) from exc


def _train(job_id: str, worker_id: str, heartbeat: Heartbeat, settings: Settings) -> Outcome:
    storage = get_storage()
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        model_name = publishing.fine_tuned_model_name(job, base_model_id(session, job))

    # Scratch space per attempt: a worker that was reaped while merely stalled may still be writing into
    # its own folder, so an attempt never touches another's. The store holds everything that must last.
    job_scratch = settings.jobs_dir / job_id
    output_dir = job_scratch / f"attempt-{job.attempt}"
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run_attempt(job, worker_id, heartbeat, settings, storage, model_name, output_dir, job_scratch)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


def _run_attempt(
    job: Job,
    worker_id: str,
    heartbeat: Heartbeat,
    settings: Settings,
    storage: Storage,
    model_name: str,
    output_dir: Path,
    job_scratch: Path,
) -> Outcome:
    from svfit_core.training import run_training

    job_id = job.id
    with session_scope() as session:
        base_id, start_key = base_model_id(session, job), starting_adapter_key(session, job)
    base_path = resolve_base_model(base_id)
    # A continued fine-tune starts from the adapter of the one it continues (a checkpoint, when resuming).
    start_from = storage.path(start_key) if start_key is not None else None
    train_examples = _load_file(storage, job.training_file, "training_file")
    valid_examples = _load_file(storage, job.validation_file, "validation_file") if job.validation_file else None
    peft = peft_spec(job.peft)
    config = train_config(
        job.hyperparameters, job.peft, seed=int(job.seed), default_checkpoint_every=settings.default_checkpoint_every
    )

    # Resume from the published copy: it survives this machine, the scratch directory may not.
    resume_step = job.last_checkpoint_step
    resume_from = storage.path(publishing.checkpoint_key(job_id, resume_step)) if resume_step else None
    if resume_from is not None and not resume_from.is_dir():
        log.warning("job %s: checkpoint step %s is missing from the store; starting over", job_id, resume_step)
        resume_step, resume_from = None, None

    reward = job_reward(job.method, org_id=job.org_id, settings=settings, storage=storage)
    reporter = JobReporter(
        job,
        worker_id,
        storage=storage,
        model_name=model_name,
        progress_interval_s=settings.progress_interval_s,
        control_poll_interval_s=settings.control_poll_interval_s,
        lost=heartbeat.lost.is_set,
        shutdown=shutdown_requested,
        resumed_step=resume_step,
        keep_epochs=settings.checkpoint_keep_epochs,
        keep_steps=settings.checkpoint_keep_steps,
    )
    if resume_step:
        reporter.published_steps.add(resume_step)
    try:
        result = run_training(
            base_path,
            train_examples,
            valid_examples,
            peft,
            config,
            output_dir,
            callbacks=reporter,
            resume_from=resume_from,
            bases=StoredBases(storage),
            reward=reward,
            start_from=start_from,
        )
    finally:
        if reward is not None:
            reward.close()
            _report_grading(job_id, reward)
    reporter.flush()
    if reporter.stop_reason == "lost":
        return "lost"

    if result.ended_by == "completion":
        _succeed(job, worker_id, storage, reporter, result, model_name)
        shutil.rmtree(job_scratch, ignore_errors=True)  # earlier attempts' leftovers too
        return JobStatus.SUCCEEDED
    if result.ended_by == "cancel":
        _finish(job_id, worker_id, JobStatus.CANCELLED, "Fine-tuning job cancelled", finished=True)
        shutil.rmtree(job_scratch, ignore_errors=True)
        return JobStatus.CANCELLED
    if result.ended_by == "pause":
        step = _publish_pause_checkpoint(reporter, result)
        if reporter.stop_reason == "shutdown":
            # The worker is stopping, not the user: put the job back in line for the next worker.
            message = "Worker stopped; the job will " + (f"resume from step {step}" if step else "restart")
            if _release(job_id, worker_id, message):
                from worker.dispatch import enqueue_job

                try:
                    enqueue_job(job_id)
                except Exception:  # noqa: BLE001 - the job is safely queued in the DB either way
                    log.exception("could not re-enqueue job %s", job_id)
            return JobStatus.QUEUED
        _finish(job_id, worker_id, JobStatus.PAUSED, f"Fine-tuning job paused at step {step or 0}", finished=False)
        return JobStatus.PAUSED
    raise RuntimeError(f"unknown training result {result.ended_by!r}")


def _report_grading(job_id: str, reward: GraderReward) -> None:
    """The job's events say what its grader could not grade and what its model graders used (best effort, as
    progress events are)."""
    lines = [(message, level) for message, level in ((reward.summary(), "warn"), (reward.usage(), "info")) if message]
    if not lines:
        return
    try:
        with session_scope() as session:
            for message, level in lines:
                add_event(session, job_id, message, level=level)
    except SQLAlchemyError:  # it runs in a `finally`: never hide the error the run ended with
        log.warning("job %s: could not record the grader's summary", job_id, exc_info=True)


def _publish_pause_checkpoint(reporter: JobReporter, result) -> int | None:  # noqa: ANN001 - TrainResult
    """Make sure the checkpoint the library saved when pausing is published; returns the resume step."""
    if result.last_checkpoint is not None:
        path = Path(result.last_checkpoint)
        step = _step_of(path, default=result.step)
        reporter.publish_checkpoint(step, path)
        if reporter.stop_reason == "lost":
            raise JobLost(reporter.job_id)
        return step
    return max(reporter.published_steps, default=None)


def _step_of(path: Path, default: int) -> int:
    step = step_of_checkpoint_dir(path.name)
    return int(default) if step is None else step


def _finish(job_id: str, worker_id: str, status: JobStatus, message: str, *, finished: bool) -> None:
    values: dict[str, Any] = {"status": status, "requested_action": None, "estimated_finish": None}
    if finished:
        values["finished_at"] = now()
    with session_scope() as session:
        if session.execute(owned(job_id, worker_id).values(**values)).rowcount != 1:
            raise JobLost(job_id)
        add_event(session, job_id, message)


def _succeed(job: Job, worker_id: str, storage: Storage, reporter: JobReporter, result, model_name: str) -> None:  # noqa: ANN001
    """Publish the final adapter, the results file and the model row, and mark the job succeeded.

    The directory copy is idempotent by key; the rows and the status change commit in one transaction
    that only applies while this worker holds the job, so a crash anywhere leaves either nothing or all of it.
    """
    if result.adapter_dir is None:
        raise RuntimeError("training succeeded without an adapter directory")
    key = publishing.final_key(job.id)
    publishing.publish_dir(
        storage,
        Path(result.adapter_dir),
        key,
        {"job_id": job.id, "step": result.step, "fine_tuned_model": model_name},
        kind="final",
    )
    with session_scope() as session:
        results = publishing.ensure_results_file(session, storage, job)
        publishing.ensure_model_row(session, job, model_name, key, None)
        session.flush()
        done = session.execute(
            owned(job.id, worker_id).values(
                status=JobStatus.SUCCEEDED,
                fine_tuned_model=model_name,
                trained_tokens=result.trained_tokens,
                result_files=[results.id],
                finished_at=now(),
                estimated_finish=None,
                requested_action=None,
                progress={
                    "step": result.step,
                    "total_steps": result.total_steps,
                    "epoch": reporter.epoch,
                    "seconds_remaining": 0,
                },
            )
        ).rowcount
        if done != 1:
            raise JobLost(job.id)
        add_event(session, job.id, f"New fine-tuned model created: {model_name}", data={"fine_tuned_model": model_name})
        add_event(session, job.id, "The job has successfully completed")
