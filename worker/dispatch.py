"""Enqueueing jobs: the one function the API (and the reaper) call after a commit, plus two broker probes
the worker needs: how many messages wait in the queue (the reaper's sweep for lost messages) and whether
the broker answers again (before a finished task's message is acknowledged).

The message carries the job id only. A duplicate message is harmless (the task re-reads the row and
exits when the work is moot), so re-enqueueing is always safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from api.core.settings import get_settings
from worker.celery_app import TASK_RUN_JOB, get_app

log = logging.getLogger(__name__)

# Fail fast when the broker is down instead of hanging the request that created the job: the caller
# decides what a failed enqueue means (the API withdraws the new job and answers 503).
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def enqueue_job(job_id: str, *, queue: str | None = None) -> None:
    """Send `job_id` to the worker queue. Call only after the transaction that wrote the job committed.

    Raises the broker's error (kombu.exceptions.OperationalError) when it cannot be reached.
    """
    get_app().send_task(
        TASK_RUN_JOB,
        args=[job_id],
        queue=queue or get_settings().worker_queue,
        retry=True,
        retry_policy=_PUBLISH_RETRY,
    )


def waiting_messages(*, queue: str | None = None) -> int:
    """How many messages wait in the worker queue (delivered, unacknowledged ones not counted).

    Raises the broker's error when it cannot be reached.
    """
    app = get_app()
    name = queue or get_settings().worker_queue
    with app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1)
        return app.amqp.queues[name].bind(connection.default_channel).queue_declare().message_count


def wait_for_broker(*, give_up: Callable[[], bool], interval_s: float = 1.0) -> bool:
    """Block until the broker accepts a connection (True), or until `give_up()` says stop (False)."""
    app = get_app()
    warned = False
    while True:
        try:
            with app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
            return True
        except Exception:  # noqa: BLE001 - whatever the transport raises for "not reachable"
            if give_up():
                return False
            if not warned:
                log.warning("the broker is unreachable; waiting for it before taking the next job")
                warned = True
            time.sleep(interval_s)
