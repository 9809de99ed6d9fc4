"""Celery tasks: thin wrappers that take a job id and call the plain-function pipeline.

Only named transient errors are retried (the database going away); everything else is recorded on the job
row by the pipeline and the task ends normally.
"""

from __future__ import annotations

from celery import shared_task
from sqlalchemy.exc import OperationalError

from worker import pipeline
from worker.celery_app import TASK_RUN_JOB


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
    return pipeline.run_job(job_id)
