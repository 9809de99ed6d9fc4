"""The job worker: a Celery app with thin tasks around `worker.pipeline`, which runs one fine-tuning job
as plain functions. Celery carries job ids only; the job row is the source of truth.
"""
