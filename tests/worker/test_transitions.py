"""Conditional status transitions and the stale-job reaper, without training, and every transition the API
and the worker perform checked against the rules in api/core/job_states.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from api.core.job_states import TRANSITIONS, JobStatus, can_transition
from api.services import jobs
from tests.worker.conftest import BASE_MODEL, chat_examples
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


# --- every transition performed is one the rules allow ----------------------------------------------------

QUEUED, RUNNING, PAUSED = JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED
SUCCEEDED, FAILED, CANCELLED = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED
STALE = {"status": RUNNING, "worker_id": "dead", "heartbeat_at": 0.0, "attempt": 1}


class StatusLog:
    """Every change of a job row's status, as (before, after), recorded by SQLite triggers (before None: created)."""

    def __init__(self) -> None:
        from api.core.db import get_engine

        self.engine = get_engine()
        with self.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE job_status_log (pk INTEGER PRIMARY KEY, before TEXT, after TEXT)")
            conn.exec_driver_sql(
                "CREATE TRIGGER job_created AFTER INSERT ON jobs"
                " BEGIN INSERT INTO job_status_log (before, after) VALUES (NULL, NEW.status); END"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER job_status_changed AFTER UPDATE OF status ON jobs WHEN OLD.status IS NOT NEW.status"
                " BEGIN INSERT INTO job_status_log (before, after) VALUES (OLD.status, NEW.status); END"
            )

    def take(self) -> set[tuple[str | None, str]]:
        """The changes recorded since the last take."""
        with self.engine.begin() as conn:
            rows = conn.exec_driver_sql("SELECT before, after FROM job_status_log").all()
            conn.exec_driver_sql("DELETE FROM job_status_log")
        return {(before, after) for before, after in rows}


def instant_training(base_path, train, valid, peft, config, output_dir, *, callbacks, resume_from=None, bases=None,  # noqa: ANN001
                     reward=None, start_from=None):
    """Stands in for the library: polls the callbacks once, then ends the run as they decide."""
    from svfit_core.training.loop import TrainResult

    decision = callbacks.should_stop()
    if decision != "continue":
        return TrainResult(decision, step=0, total_steps=1, trained_tokens=0)
    adapter = Path(output_dir) / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    return TrainResult("completion", step=1, total_steps=1, trained_tokens=1, adapter_dir=adapter)


def failing_training(*args, **kwargs):  # noqa: ANN002, ANN003
    raise RuntimeError("the run broke")


def api(call: Callable, job_id: str, **kwargs) -> Callable[[], object]:  # noqa: ANN003
    """The API's transition `call` on `job_id`, as the route makes it."""

    def act() -> object:
        from api.core.db import session_scope

        with session_scope() as session:
            return call(session, "org-test", job_id, **kwargs)

    return act


def create(service, monkeypatch) -> Callable[[], object]:  # noqa: ANN001
    from api.core.db import session_scope
    from api.schemas import JobCreate

    request = JobCreate(model=BASE_MODEL, training_file=service.add_file(chat_examples()), peft={"rank": 4})

    def act() -> object:
        with session_scope() as session:
            return jobs.create_job(
                session, service.settings, org_id="org-test", request=request, idempotency_key=None,
                dispatch=enqueued_fine,
            )

    return act


def enqueued_fine(job_id: str) -> None:
    pass


def refused_enqueue(job_id: str) -> None:
    raise ConnectionError("broker down")


def resume_without_a_broker(service, monkeypatch) -> Callable[[], object]:  # noqa: ANN001
    resume = api(jobs.resume_job, service.add_job(validation=False, status=PAUSED), dispatch=refused_enqueue)

    def act() -> None:
        with pytest.raises(jobs.ServiceUnavailable):
            resume()

    return act


def ask_a_running_job(service, monkeypatch) -> Callable[[], object]:  # noqa: ANN001
    job_id = service.add_job(validation=False, status=RUNNING, worker_id="w", heartbeat_at=time.time())
    asks = [
        api(jobs.pause_job, job_id), api(jobs.resume_job, job_id, dispatch=enqueued_fine), api(jobs.cancel_job, job_id)
    ]
    return lambda: [ask() for ask in asks]


def work(training: Callable, **job: object) -> Callable:
    """A worker running the job (`job` its row's values) with `training` in place of the library."""

    def arrange(service, monkeypatch) -> Callable[[], object]:  # noqa: ANN001
        monkeypatch.setattr("svfit_core.training.run_training", training)
        job_id = service.add_job(validation=False, **job)
        return lambda: pipeline.run_job(job_id)

    return arrange


def shut_down_while_working(service, monkeypatch) -> Callable[[], object]:  # noqa: ANN001
    run = work(instant_training)(service, monkeypatch)

    def act() -> object:
        recovery.request_shutdown()
        try:
            return run()
        finally:
            recovery._shutdown.clear()

    return act


def reap(**job: object) -> Callable:
    def arrange(service, monkeypatch) -> Callable[[], object]:  # noqa: ANN001
        service.add_job(validation=False, **{**STALE, **job})
        return recovery.reap_stale_jobs

    return arrange


def on_job(call: Callable, status: JobStatus, **kwargs) -> Callable:  # noqa: ANN003
    def arrange(service, monkeypatch) -> Callable[[], object]:  # noqa: ANN001
        return api(call, service.add_job(validation=False, status=status), **kwargs)

    return arrange


# What each of the service's ways of changing a job does to its status.
PERFORMED = {
    "the API creates a job": (create, {(None, QUEUED)}),
    "the API pauses a queued job": (on_job(jobs.pause_job, QUEUED), {(QUEUED, PAUSED)}),
    "the API cancels a queued job": (on_job(jobs.cancel_job, QUEUED), {(QUEUED, CANCELLED)}),
    "the API cancels a paused job": (on_job(jobs.cancel_job, PAUSED), {(PAUSED, CANCELLED)}),
    "the API resumes a paused job": (on_job(jobs.resume_job, PAUSED, dispatch=enqueued_fine), {(PAUSED, QUEUED)}),
    "the API resumes a job but cannot enqueue it": (resume_without_a_broker, {(PAUSED, QUEUED), (QUEUED, PAUSED)}),
    "the API only asks a running job": (ask_a_running_job, set()),
    "a worker trains a job": (work(instant_training), {(QUEUED, RUNNING), (RUNNING, SUCCEEDED)}),
    "a worker pauses on request": (
        work(instant_training, requested_action="pause"), {(QUEUED, RUNNING), (RUNNING, PAUSED)}
    ),
    "a worker cancels on request": (
        work(instant_training, requested_action="cancel"), {(QUEUED, RUNNING), (RUNNING, CANCELLED)}
    ),
    "a worker's run fails": (work(failing_training), {(QUEUED, RUNNING), (RUNNING, FAILED)}),
    "a stopping worker hands its job back": (shut_down_while_working, {(QUEUED, RUNNING), (RUNNING, QUEUED)}),
    "the reaper re-queues a stale job": (reap(), {(RUNNING, QUEUED)}),
    "the reaper pauses a stale job asked to pause": (reap(requested_action="pause"), {(RUNNING, PAUSED)}),
    "the reaper cancels a stale job asked to cancel": (reap(requested_action="cancel"), {(RUNNING, CANCELLED)}),
    "the reaper fails a job out of attempts": (reap(attempt=3), {(RUNNING, FAILED)}),
}


def test_every_transition_the_service_performs_is_allowed_and_every_allowed_one_is_performed(
    service, enqueued, monkeypatch
):
    log = StatusLog()
    performed: set[tuple[str | None, str]] = set()
    for name, (arrange, expected) in PERFORMED.items():
        with monkeypatch.context() as patch:
            act = arrange(service, patch)
            log.take()  # the rows the scenario started from
            act()
        seen = log.take()
        assert seen == expected, name
        assert all(can_transition(before, after) for before, after in seen), f"{name}: {seen}"
        performed |= seen
    allowed = {(before, after) for before, targets in TRANSITIONS.items() for after in targets}
    assert performed == allowed, f"allowed but never performed: {allowed - performed}"
