"""The broker dies (SIGKILL, no persistence: every message is lost) while one job waits and two run; while
it is down a client creates a job, one worker is stopped (SIGTERM) and the other finishes its job.

Expected: creating a job answers 503 with Retry-After and leaves no job behind; reads keep working; the
stopped worker checkpoints and hands its job back though it cannot enqueue it; and once Redis is back the
remaining worker, whose job ended while the broker was away, takes work again, and the reaper's sweep
re-sends the lost messages, so every job succeeds, each completed exactly once.
"""

from __future__ import annotations

import pytest

from api.core.tables import Job
from tests.faults.checks import assert_trained_once

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.e2e, pytest.mark.postgres]


def test_redis_restart_loses_no_job(cluster, file_id):
    # Two workers: the first two jobs run (40 steps: long enough to outlast the first checks), the third waits.
    jobs = []
    for i, n_epochs in enumerate((4, 4, 2)):
        hyperparameters = {"n_epochs": n_epochs, "batch_size": 4}
        response = cluster.create_job(file_id, suffix=f"broker-{i}", hyperparameters=hyperparameters)
        assert response.status_code == 200, response.text
        jobs.append(response.json()["id"])
    (stopped_job, finishing_job), waiting = jobs[:2], jobs[2]
    for job_id in (stopped_job, finishing_job):
        cluster.wait_job(job_id, lambda j: j.status == "running" and (j.progress or {}).get("step", 0) >= 1, 90,
                         "training")
    assert cluster.job(waiting).status == "queued"

    cluster.redis.kill()

    # Creating a job needs the queue: 503 + Retry-After, and the job is withdrawn (the client retries).
    refused = cluster.create_job(file_id, suffix="broker-retried")
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "service_unavailable"
    assert not cluster.rows(Job, Job.suffix == "broker-retried")
    # Reads need only the database.
    assert cluster.http.get(f"/fine_tuning/jobs/{waiting}").json()["status"] == "queued"

    # A worker stopped while the broker is down hands its job back but cannot enqueue it.
    stopped = cluster.worker_with_pid(int(cluster.job(stopped_job).worker_id.split(":")[1]))
    stopped.terminate()
    cluster.wait_job(stopped_job, lambda j: j.status == "queued", 60, "handed back to the queue")
    stopped.process.wait(timeout=60)
    # The other worker's job ends while the broker is still away: it cannot acknowledge the message yet.
    cluster.wait_job(finishing_job, lambda j: j.status == "succeeded", 120, "finished")

    cluster.redis.start()
    retried = cluster.create_job(file_id, suffix="broker-retried")
    assert retried.status_code == 200, retried.text
    jobs.append(retried.json()["id"])

    # One worker is left: only if it consumes again, and the lost messages are re-sent, does all this finish.
    for job_id in jobs:
        cluster.wait_terminal(job_id, timeout=180)
        assert_trained_once(cluster, job_id)
    assert cluster.job(stopped_job).attempt == 2
    assert any(m.startswith("Fine-tuning job resumed from step") for m in cluster.messages(stopped_job))
    for job_id in (finishing_job, waiting, jobs[-1]):
        assert cluster.job(job_id).attempt == 1, cluster.messages(job_id)
