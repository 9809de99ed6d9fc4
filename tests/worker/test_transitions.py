"""Conditional status transitions and the stale-job reaper, without training."""

from __future__ import annotations

import threading
import time

import pytest

from worker import pipeline, recovery


def test_only_one_of_two_claims_wins(service):
    job_id = service.add_job(validation=False)
    assert pipeline.claim_job(job_id, "worker-a") is True
    assert pipeline.claim_job(job_id, "worker-b") is False
    job = service.job(job_id)
    assert (job.status, job.worker_id, job.attempt) == ("running", "worker-a", 1)
    assert job.started_at is not None and job.heartbeat_at is not None


def test_racing_claims_from_threads_have_one_winner(service):
    job_id = service.add_job(validation=False)
    barrier = threading.Barrier(8)
    wins: list[str] = []

    def claim(name: str) -> None:
        barrier.wait()
        if pipeline.claim_job(job_id, name):
            wins.append(name)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert service.job(job_id).worker_id == wins[0]


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled", "paused"])
def test_a_message_for_a_finished_job_is_moot(service, status):
    job_id = service.add_job(validation=False, status=status)
    assert pipeline.run_job(job_id) == status
    assert service.job(job_id).attempt == 0


def test_a_job_held_by_a_live_worker_is_left_alone(service):
    job_id = service.add_job(validation=False, status="running", worker_id="other", heartbeat_at=time.time())
    assert pipeline.run_job(job_id) == "held"
    assert service.job(job_id).worker_id == "other"


def test_an_unknown_job_id_is_moot(service):
    assert pipeline.run_job("ftjob-doesnotexist") == "missing"


@pytest.fixture
def enqueued(monkeypatch) -> list[str]:
    sent: list[str] = []
    monkeypatch.setattr("worker.dispatch.enqueue_job", lambda job_id, **kw: sent.append(job_id) or True)
    return sent


def test_reaper_requeues_a_stale_job_and_reenqueues_it(service, enqueued):
    stale = service.add_job(
        validation=False, status="running", worker_id="dead", heartbeat_at=time.time() - 120,
        last_checkpoint_step=5, attempt=1,
    )
    live = service.add_job(validation=False, status="running", worker_id="alive", heartbeat_at=time.time())

    assert recovery.reap_stale_jobs() == [stale]

    job = service.job(stale)
    assert (job.status, job.worker_id, job.heartbeat_at) == ("queued", None, None)
    assert service.events(stale)[-1].message == "Worker lost; resuming from step 5"
    assert service.events(stale)[-1].level == "warn"
    assert enqueued == [stale]
    assert service.job(live).status == "running"
    # A second reaper finds nothing: the transition is conditional.
    assert recovery.reap_stale_jobs() == []


def test_reaper_honours_a_pending_cancel_and_caps_attempts(service, enqueued):
    cancel = service.add_job(
        validation=False, status="running", worker_id="dead", heartbeat_at=time.time() - 120, requested_action="cancel",
    )
    exhausted = service.add_job(
        validation=False, status="running", worker_id="dead", heartbeat_at=time.time() - 120, attempt=3,
    )

    assert recovery.reap_stale_jobs() == []

    assert service.job(cancel).status == "cancelled"
    job = service.job(exhausted)
    assert job.status == "failed" and job.error["code"] == "worker_lost"
    assert enqueued == []


def test_heartbeat_notices_a_lost_job(service):
    job_id = service.add_job(validation=False)
    assert pipeline.claim_job(job_id, "me")
    with recovery.Heartbeat(job_id, "me", interval=0.05) as beat:
        time.sleep(0.2)
        assert not beat.lost.is_set()
        service.update_job(job_id, status="queued", worker_id=None)
        deadline = time.monotonic() + 5
        while not beat.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert beat.lost.is_set()
