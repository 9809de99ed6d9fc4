"""Crash recovery: the running job's heartbeat, the stale-job reaper, and the worker's shutdown flag.

A worker that holds a job stamps `Job.heartbeat_at` from a background thread. Every worker also runs a
reaper thread that finds `running` jobs whose beat is older than `heartbeat_timeout_s`, puts them back to
`queued` with a conditional update (so two reapers never both win) and re-enqueues them; the next worker
resumes from the job's last published checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from api.core.db import session_scope
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

    The update is conditional on `worker_id` and `status='running'`: when it matches no row the job was
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
                .where(Job.id == self.job_id, Job.worker_id == self.worker_id, Job.status == "running")
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
        stale = list(session.scalars(select(Job.id).where(Job.status == "running", Job.heartbeat_at < cutoff)))
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
            target, values, level, message = "cancelled", {"finished_at": now()}, "info", "Fine-tuning job cancelled"
        elif job.requested_action == "pause":
            target, values, level = "paused", {}, "info"
            message = f"Fine-tuning job paused at step {step or 0}"
        elif job.attempt >= max_attempts:
            target, level = "failed", "error"
            message = f"The job failed: its worker was lost {job.attempt} times."
            values = {
                "finished_at": now(),
                "error": {"code": "worker_lost", "message": message, "param": None},
            }
        else:
            target, values, level = "queued", {}, "warn"
            message = f"Worker lost; resuming from step {step}" if step else "Worker lost; restarting from step 0"
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.heartbeat_at < cutoff)
            .values(status=target, worker_id=None, heartbeat_at=None, requested_action=None, **values)
        )
        if result.rowcount != 1:
            return False  # another reaper won, or the worker beat just in time
        add_event(session, job_id, message, level=level)
    log.warning("reaped stale job %s -> %s", job_id, target)
    return target == "queued"


class Reaper:
    """A daemon thread in every worker process that runs `reap_stale_jobs` periodically."""

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
            try:
                reap_stale_jobs()
            except Exception:  # noqa: BLE001 - the reaper must outlive any one failure
                log.warning("reaper pass failed", exc_info=True)
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
