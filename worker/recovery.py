"""Crash recovery: the running job's heartbeat, the stale-job reaper, the sweep for queued jobs whose
message was lost, and the worker's shutdown flag.

A worker that holds a job stamps `Job.heartbeat_at` from a background thread. Every worker also runs a
reaper thread that finds `running` jobs whose beat is older than `heartbeat_timeout_s`, puts them back to
`queued` with a conditional update (so two reapers never both win) and re-enqueues them; the next worker
resumes from the job's last published checkpoint. The same thread re-enqueues `queued` jobs that have no
message left in the broker (see `redispatch_orphaned_jobs`).
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from api.core.db import session_scope
from api.core.job_states import WAITING, JobStatus
from api.core.settings import get_settings
from api.core.tables import Job, now
from worker.reporting import add_event

log = logging.getLogger(__name__)

# Set when the worker process is asked to stop (SIGTERM): the running job checkpoints and goes back to
# `queued` instead of holding the process for the rest of its training.
_shutdown = threading.Event()


def request_shutdown() -> None:
    _shutdown.set()


def shutdown_requested() -> bool:
    return _shutdown.is_set()


class Heartbeat:
    """Stamps `heartbeat_at` every `interval` seconds while this worker still holds the job.

    The update is conditional on `worker_id` and a running status: when it matches no row the job was
    taken away (reaped, cancelled by an operator), `lost` is set and training should stop without writing
    any further state.
    """

    def __init__(self, job_id: str, worker_id: str, interval: float):
        self.job_id = job_id
        self.worker_id = worker_id
        self.interval = interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def beat(self) -> bool:
        with session_scope() as session:
            result = session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.worker_id == self.worker_id, Job.status == JobStatus.RUNNING)
                .values(heartbeat_at=time.time())
            )
            return result.rowcount == 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.beat():
                    log.warning("job %s is no longer held by %s; stopping", self.job_id, self.worker_id)
                    self.lost.set()
                    return
            except SQLAlchemyError:
                # A database blip must not kill the beat; if it lasts, the reaper decides.
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)


def reap_stale_jobs(timeout_s: float | None = None) -> list[str]:
    """Re-queue (and re-enqueue) every `running` job whose worker stopped beating. Returns their ids.

    A stale job with a pending cancel/pause is finished that way instead; one that already used up
    `max_job_attempts` fails, so a job that kills its worker every time (say, the kernel's OOM killer)
    does not loop forever.
    """
    settings = get_settings()
    timeout_s = settings.heartbeat_timeout_s if timeout_s is None else timeout_s
    cutoff = time.time() - timeout_s
    requeued: list[str] = []
    with session_scope() as session:
        stale = list(session.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff)))
    for job_id in stale:
        try:
            if _reap_one(job_id, cutoff, settings.max_job_attempts):
                requeued.append(job_id)
        except SQLAlchemyError:
            log.warning("could not reap job %s", job_id, exc_info=True)
    _send(requeued)
    return requeued


# Re-queued jobs whose message could not be sent (broker down); every reaper pass tries them again.
_unsent: set[str] = set()


def _send(job_ids: list[str]) -> None:
    # Called only after the commits: a worker must never see an id whose new state is not visible.
    from worker.dispatch import enqueue_job

    for job_id in [*job_ids, *sorted(_unsent.difference(job_ids))]:
        try:
            enqueue_job(job_id)
        except Exception:  # noqa: BLE001 - any broker failure; the job is safely queued in the DB
            log.warning("could not enqueue job %s; will retry", job_id, exc_info=True)
            _unsent.add(job_id)
        else:
            _unsent.discard(job_id)


def _reap_one(job_id: str, cutoff: float, max_attempts: int) -> bool:
    """Take one stale job back; True when it went back to `queued` (and needs a message)."""
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one_or_none()
        if job is None:
            return False
        step = job.last_checkpoint_step
        if job.requested_action == "cancel":
            target, values, level = JobStatus.CANCELLED, {"finished_at": now()}, "info"
            message = "Fine-tuning job cancelled"
        elif job.requested_action == "pause":
            target, values, level = JobStatus.PAUSED, {}, "info"
            message = f"Fine-tuning job paused at step {step or 0}"
        elif job.attempt >= max_attempts:
            target, level = JobStatus.FAILED, "error"
            message = f"The job failed: its worker was lost {job.attempt} times."
            values = {
                "finished_at": now(),
                "error": {"code": "worker_lost", "message": message, "param": None},
            }
        else:
            target, values, level = JobStatus.QUEUED, {}, "warn"
            message = f"Worker lost; resuming from step {step}" if step else "Worker lost; restarting from step 0"
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff)
            .values(status=target, worker_id=None, heartbeat_at=None, requested_action=None, **values)
        )
        if result.rowcount != 1:
            return False  # another reaper won, or the worker beat just in time
        add_event(session, job_id, message, level=level)
    log.warning("reaped stale job %s -> %s", job_id, target)
    return target == JobStatus.QUEUED


# Whether the previous sweep found fewer messages than waiting jobs (this process's reaper thread only).
_shortfall_seen = False


def redispatch_orphaned_jobs(min_age_s: float | None = None) -> list[str]:
    """Re-enqueue waiting jobs when the queue holds fewer messages than there are jobs waiting for one.

    A message is lost when the broker restarts without persistence or when an enqueue after a commit fails
    (a worker's SIGTERM hand-back or the API dying between its commit and its send). The counts cannot
    tell which job lost its message, so every job waiting longer than `min_age_s` is sent again: the
    duplicates are harmless (the claim is conditional), and afterwards the queue holds at least one
    message per waiting job, so nothing is re-sent until messages are lost again. The age keeps a job
    whose enqueue is still in flight from being counted, and a shortfall must be seen on two passes in a
    row: a worker that has just taken a message but not yet claimed its job shows one for a moment.
    Like the reaper, it sends to this worker's queue: the service routes every job to one worker queue.
    Returns the re-enqueued ids.
    """
    global _shortfall_seen
    from worker.dispatch import enqueue_job, waiting_messages

    settings = get_settings()
    min_age_s = settings.redispatch_after_s if min_age_s is None else min_age_s
    cutoff = now() - min_age_s
    with session_scope() as session:
        # A job put back in line (reaped, handed back on SIGTERM) keeps its old created_at: it counts at once.
        waiting = list(
            session.scalars(
                select(Job.id)
                .where(Job.status.in_(WAITING), or_(Job.created_at <= cutoff, Job.attempt > 0))
                .order_by(Job.pk)
            )
        )
        queued_total = session.scalar(select(func.count()).where(Job.status.in_(WAITING)))
    # Jobs younger than the cutoff may hold messages too: count them all against the messages.
    if not waiting or waiting_messages() >= queued_total:
        _shortfall_seen = False
        return []
    if not _shortfall_seen:
        _shortfall_seen = True
        return []
    _shortfall_seen = False
    for job_id in waiting:
        enqueue_job(job_id)
    log.warning("re-enqueued %d queued job(s) whose message was lost: %s", len(waiting), ", ".join(waiting))
    return waiting


def _unreachable(exc: Exception) -> bool:
    """Whether `exc` says the database or the broker cannot be reached (rather than a bug)."""
    from kombu.exceptions import OperationalError as BrokerUnreachable

    return isinstance(exc, (SQLAlchemyError, BrokerUnreachable, ConnectionError, TimeoutError))


class Reaper:
    """A daemon thread in every worker process that runs `reap_stale_jobs` and `redispatch_orphaned_jobs`
    periodically."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="svfit-reaper", daemon=True)

    def start(self) -> "Reaper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        while True:
            for task in (reap_stale_jobs, redispatch_orphaned_jobs):
                try:
                    task()
                except Exception as exc:  # noqa: BLE001 - the reaper must outlive any one failure
                    # A database or broker that is down is expected here, once per pass: no traceback for it.
                    log.warning("%s failed: %s", task.__name__, exc, exc_info=not _unreachable(exc))
            if self._stop.wait(self.interval):
                return


_reaper: Reaper | None = None


def start_reaper() -> Reaper:
    """Start this process's reaper once (called from Celery's worker_ready signal)."""
    global _reaper
    if _reaper is None:
        settings = get_settings()
        # Checking a few times per timeout bounds the detection delay to about 1.25 × the timeout.
        interval = max(0.5, min(settings.heartbeat_timeout_s / 4, 15.0))
        _reaper = Reaper(interval).start()
    return _reaper
