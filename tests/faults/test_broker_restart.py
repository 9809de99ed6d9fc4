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
    # Two workers: two jobs run, the third waits in the queue.
    jobs = [cluster.submit(file_id, suffix=f"broker-{i}") for i in range(3)]
    running = wait_until(
        lambda: (lambda rows: rows if len(rows) == 2 else None)(
            [j for j in jobs if (cluster.job(j).progress or {}).get("step", 0) >= 1]
        ),
        90,
        "two jobs to be training",
    )
    [waiting] = [j for j in jobs if j not in running]
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
