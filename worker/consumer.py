"""Running a worker process: the Celery consumer of one queue, with the service's recovery threads started
when it is ready and the running job asked to checkpoint when it is told to stop.

Kept apart from `celery_app.py`, which producers import too: only a process that consumes jobs hooks
these signals.
"""

from __future__ import annotations

import os
from typing import Any

from celery import signals

from worker.celery_app import get_app
from worker.recovery import request_shutdown, start_reaper


def _on_worker_ready(**_kwargs: Any) -> None:
    from transformers.utils import logging as hf_logging

    # Celery logs stdout/stderr as warnings; a progress bar per model load would drown the real ones.
    hf_logging.disable_progress_bar()
    start_reaper()


def _on_worker_shutting_down(**_kwargs: Any) -> None:
    request_shutdown()


def run_consumer(queue: str, loglevel: str) -> None:
    """Consume `queue` in this process, one job at a time, until told to stop (SIGTERM: warm shutdown)."""
    signals.worker_ready.connect(_on_worker_ready, weak=False)
    signals.worker_shutting_down.connect(_on_worker_shutting_down, weak=False)
    get_app().worker_main(
        [
            "worker",
            "--queues", queue,
            "--concurrency", "1",
            "--pool", "solo",
            "--loglevel", loglevel.upper(),
            # Gossip, mingle and broker heartbeats serve remote control, which the service does not use.
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", f"svfit-{queue}-{os.getpid()}@%h",
        ]
    )
