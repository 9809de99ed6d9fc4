"""The job queue as the API sees it: one function that hands the id of a committed job to the workers.

The API never imports the worker. Whoever starts the API passes the implementation in (`svfit serve` and
`svfit api` pass the worker's Celery one, `worker.dispatch.enqueue_job`; tests pass a recorder). It must
raise when the job could not be enqueued: the API then withdraws the job and answers 503.
"""

from __future__ import annotations

from collections.abc import Callable

# Called only after the transaction that wrote the job committed, with the job's public id.
EnqueueJob = Callable[[str], None]
