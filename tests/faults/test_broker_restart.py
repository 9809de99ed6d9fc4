"""The broker dies (SIGKILL, no persistence: every message is lost) while one job is queued and two run, and
while it is down a worker is stopped (SIGTERM) and a client creates a job.

Expected: creating a job answers 503 with Retry-After and leaves no job behind; reads keep working; the
stopped worker checkpoints and hands its job back though it cannot enqueue it; and once Redis is back
the reaper's sweep re-sends the lost messages, so every job succeeds, each completed exactly once.
"""

from __future__ import annotations

import pytest

from api.core.tables import Job
from tests.faults.checks import assert_trained_once
from tests.faults.cluster import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.e2e, pytest.mark.postgres]


def test_redis_restart_loses_no_job(cluster, file_id):
    # Two workers: the first two jobs run (60 steps: long enough to outlast what follows), the third waits.
    jobs = []
    for i, n_epochs in enumerate((6, 6, 2)):
        response = cluster.create_job(file_id, suffix=f"broker-{i}", hyperparameters={"n_epochs": n_epochs, "batch_size": 4})
        assert response.status_code == 200, response.text
        jobs.append(response.json()["id"])
    running, waiting = jobs[:2], jobs[2]
    for job_id in running:
        cluster.wait_job(job_id, lambda j: j.status == "running" and (j.progress or {}).get("step", 0) >= 1, 90,
                         "training")
    assert cluster.job(waiting).status == "queued"

    cluster.redis.kill()

    # Creating a job needs the queue: 503 + Retry-After, and the job is withdrawn (the client retries).
    refused = cluster.create_job(file_id, suffix="broker-retried")
    assert refused.status_code == 503, refused.text
    assert refused.headers.get("retry-after")
    assert refused.json()["error"]["code"] == "service_unavailable"
    assert not cluster.rows(Job, Job.suffix == "broker-retried")
    # Reads need only the database.
    assert cluster.http.get(f"/fine_tuning/jobs/{waiting}").json()["status"] == "queued"

    # A worker stopped while the broker is down hands its job back but cannot enqueue it.
    holder_pid = int(cluster.job(running[0]).worker_id.split(":")[1])
    stopped = cluster.worker_with_pid(holder_pid)
    stopped.terminate()
    cluster.wait_job(running[0], lambda j: j.status == "queued", 60, "handed back to the queue")
    stopped.process.wait(timeout=60)

    cluster.redis.start()
    cluster.start_worker()  # replaces the stopped one
    retried = cluster.create_job(file_id, suffix="broker-retried")
    assert retried.status_code == 200, retried.text
    jobs.append(retried.json()["id"])

    for job_id in jobs:
        cluster.wait_terminal(job_id, timeout=180)
        assert_trained_once(cluster, job_id)
    handed_back = cluster.job(running[0])
    assert handed_back.attempt == 2
    assert any(m.startswith("Fine-tuning job resumed from step") for m in cluster.messages(running[0]))
    for job_id in jobs[1:]:
        if job_id != running[0]:
            assert cluster.job(job_id).attempt == 1, cluster.messages(job_id)
