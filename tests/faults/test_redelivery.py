"""The same job id delivered several times to two idle workers at once (a broker redelivery, a duplicate
send): the conditional claim lets exactly one of them train it."""

from __future__ import annotations

import pytest

from api.core.settings import Settings
from tests.faults.checks import assert_trained_once
from tests.faults.cluster import wait_until
from worker.celery_app import TASK_RUN_JOB, make_celery

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.e2e, pytest.mark.postgres]


def test_duplicate_messages_train_the_job_once(cluster, file_id, tmp_path):
    for worker in cluster.live_workers():
        worker.wait_ready(timeout=120)
    producer = make_celery(Settings(broker_url=cluster.redis.url, worker_queue=cluster.queue, data_dir=tmp_path))
    job_id = cluster.submit(file_id, suffix="redelivered")
    for _ in range(3):
        producer.send_task(TASK_RUN_JOB, args=[job_id], queue=cluster.queue)

    job = cluster.wait_terminal(job_id)
    assert job.status == "succeeded", (job.error, cluster.logs())
    assert job.attempt == 1
    assert_trained_once(cluster, job_id)
    assert cluster.messages(job_id).count("Fine-tuning job started") == 1
    # Every copy was consumed and found the job taken or finished; the other worker got some of them.
    wait_until(lambda: cluster.redis.llen(cluster.queue) == 0, 60, "every copy to be consumed")
    holder = int(job.worker_id.split(":")[1])
    others = [w for w in cluster.live_workers() if w.pid != holder]
    assert any(job_id in w.log() for w in others), "the race never happened: one worker took every copy"
