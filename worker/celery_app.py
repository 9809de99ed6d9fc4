"""The Celery application: broker choice, JSON-only messages and one-job-per-process settings.

Production points `SVFIT_BROKER_URL` at Redis; the embedded default uses a filesystem transport on folders
under `settings.queue_dir` (kombu's, made safe for concurrent producers: `worker/filesystem_queue.py`),
so `svfit serve` needs no broker. There is no result backend: the job row is the source of truth and
tasks return nothing.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from api.core.settings import Settings, get_settings

TASK_RUN_JOB = "svfit.run_job"

# The filesystem transport polls its folder; 0.1 s keeps create → running around a tenth of a second
# while costing one `listdir` per tick.
FILESYSTEM_POLL_S = 0.1


# The embedded queue's transport class (kombu resolves "module:Class").
FILESYSTEM_TRANSPORT = "worker.filesystem_queue:Transport"


def broker_config(settings: Settings) -> tuple[str, str | None, dict[str, Any]]:
    """The broker URL, transport class (None: the URL's own) and transport options for these settings."""
    if settings.embedded_queue:
        # Producer (API) and consumer (worker) share one folder: what one writes the other reads. Claimed
        # messages are renamed into a sibling folder, which must be on the same filesystem.
        messages = settings.queue_dir / "messages"
        control = settings.queue_dir / "control"
        claimed = settings.queue_dir / "claimed"
        for folder in (messages, control, claimed):
            folder.mkdir(parents=True, exist_ok=True)
        # The host part means nothing to this transport; naming one keeps kombu from warning on every connect.
        return "filesystem://localhost/", FILESYSTEM_TRANSPORT, {
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "control_folder": str(control),
            "claimed_folder": str(claimed),
            "store_processed": False,
            "polling_interval": FILESYSTEM_POLL_S,
        }
    # With acks_late, Redis re-delivers a message still unacked after visibility_timeout. A long training
    # run keeps its message unacked for hours; the re-delivered copy is harmless (the task sees the job held
    # by a live worker and exits), but a long timeout keeps that noise rare. Crash recovery does not rely on
    # it: the heartbeat reaper re-queues a dead worker's job within heartbeat_timeout_s.
    return settings.broker_url, None, {"visibility_timeout": 6 * 3600}


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    broker_url, transport, transport_options = broker_config(settings)
    app = Celery("svfit", include=["worker.tasks"])
    app.conf.update(
        broker_url=broker_url,
        broker_transport=transport,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # A job is acked when it ends, so a worker that dies mid-job leaves the message to be re-delivered
        # (Redis) and, either way, the reaper re-queues the job from its heartbeat.
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        # One job per worker process: training owns the device, so never reserve a second message.
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # The job runs in the worker's main process: the heartbeat thread dies with it (so a lost worker is
        # noticed), and a warm shutdown (SIGTERM) can ask the running job to checkpoint and re-queue.
        worker_pool="solo",
        task_default_queue=settings.worker_queue,
        task_create_missing_queues=True,
        # Remote control and events need fanout exchanges and chatter the service does not use.
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
    )
    return app


@lru_cache
def get_app() -> Celery:
    return make_celery()


def __getattr__(name: str) -> Celery:
    # `celery -A worker.celery_app` looks up `app`; building it lazily lets tests and the CLI set the
    # environment (data dir, broker, queue) before the settings are read.
    if name in {"app", "celery"}:
        return get_app()
    raise AttributeError(name)
