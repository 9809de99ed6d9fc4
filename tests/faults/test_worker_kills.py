"""SIGKILL a worker while it writes a checkpoint into the store and while it publishes the final adapter.

The worker is stopped exactly there by a fault point (worker/faults.py), so the store holds a torn
`.part` at the moment of the kill. Afterwards: the reaper hands the job to the other worker, which
finishes it; nothing torn is left or published; the job completed once; and its adapter equals an
uninterrupted run's. (A kill at an arbitrary step is tests/worker/test_celery.py's.)
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.faults.checks import assert_store_clean, assert_trained_once
from tests.faults.cluster import wait_until
from worker import publishing

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.e2e, pytest.mark.postgres]


@pytest.mark.parametrize(
    ("point", "torn_key"),
    [
        ("checkpoint_write", lambda job_id: publishing.checkpoint_key(job_id, 5)),
        ("artifact_publish", publishing.final_key),
    ],
    ids=["during-checkpoint-write", "during-artifact-publish"],
)
def test_worker_killed_mid_write_leaves_nothing_torn(cluster, file_id, references, models_dir, point, torn_key):
    cluster.arm(point)
    job_id = cluster.submit(file_id, suffix=point.replace("_", "-"))

    pid = wait_until(lambda: cluster.fired_pid(point), 120, f"a worker to reach {point}")
    torn = cluster.store_root() / f"{torn_key(job_id)}.part"
    assert torn.is_dir(), f"expected the half-written {torn.name} in the store"
    assert not (cluster.store_root() / torn_key(job_id)).exists()
    victim = cluster.worker_with_pid(pid)
    os.kill(victim.pid, signal.SIGKILL)
    victim.process.wait()

    job = cluster.wait_terminal(job_id)
    assert job.status == "succeeded", (job.error, cluster.logs())
    assert job.attempt >= 2 and int(job.worker_id.split(":")[1]) != pid
    messages = cluster.messages(job_id)
    assert any(m.startswith("Worker lost;") for m in messages), messages
    assert_trained_once(cluster, job_id)
    assert_store_clean(cluster, job_id, models_dir)
    references.assert_matches(cluster, job_id)
