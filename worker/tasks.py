"""Celery tasks: thin wrappers that take a job id and call the plain-function pipeline.

Only named transient errors are retried (the database going away); everything else is recorded on the job
row by the pipeline and the task ends normally.
"""

from __future__ import annotations

from celery import shared_task
from sqlalchemy.exc import OperationalError

from worker import pipeline
from worker.celery_app import TASK_RUN_JOB
from worker.dispatch import wait_for_broker
from worker.recovery import shutdown_requested


@shared_task(
    name=TASK_RUN_JOB,
    ignore_result=True,
    acks_late=True,
    autoretry_for=(OperationalError,),
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=5,
)
def run_job(job_id: str) -> str:
    try:
        return pipeline.run_job(job_id)
    finally:
        # The message is acknowledged as soon as this returns (with the solo pool even an early ack waits
        # for the task). If the broker went away meanwhile, that ack fails, kombu keeps the message counted
        # as unacknowledged, and with a prefetch of one the worker never asks for another message: it sits
        # idle for good once the broker is back. Waiting for the broker first lets the ack through.
        wait_for_broker(give_up=shutdown_requested)
