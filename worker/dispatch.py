"""Enqueueing jobs: the one function the API (and the reaper) call after a commit.

The message carries the job id only. A duplicate message is harmless (the task re-reads the row and
exits when the work is moot), so re-enqueueing is always safe.
"""

from __future__ import annotations

import logging

from api.core.settings import get_settings
from worker.celery_app import TASK_RUN_JOB, get_app

log = logging.getLogger(__name__)

# Fail fast when the broker is down instead of hanging the request that created the job; the job stays
# `queued` in the database and a later enqueue (resume, reaper, retry) can still pick it up.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def enqueue_job(job_id: str, *, queue: str | None = None) -> bool:
    """Send `job_id` to the worker queue. Call only after the transaction that wrote the job committed.

    Returns False (and logs) when the broker could not be reached rather than raising: the row is already
    committed and the caller has nothing useful to roll back.
    """
    queue = queue or get_settings().worker_queue
    try:
        get_app().send_task(TASK_RUN_JOB, args=[job_id], queue=queue, retry=True, retry_policy=_PUBLISH_RETRY)
    except Exception:  # noqa: BLE001 - any broker failure leaves the job queued in the DB
        log.exception("could not enqueue job %s on queue %s", job_id, queue)
        return False
    return True
