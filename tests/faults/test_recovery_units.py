"""The pieces the fault suite relies on, in-process and fast: the fault points are inert unless set and fire
once when armed, a full disk while publishing leaves no `.part` and fails the job with a clear code, and
the sweep re-sends a queued job whose message is gone (once, not on every pass)."""

from __future__ import annotations

import errno

import pytest

from tests.worker.conftest import service, tiny_llama  # noqa: F401 - fixtures: a SQLite service on the fs queue
from worker import faults, pipeline, publishing, recovery
from worker.dispatch import enqueue_job, waiting_messages

pytestmark = [pytest.mark.faults]


def test_fault_points_are_inert_unless_listed(monkeypatch):
    monkeypatch.delenv(faults.ENV_POINTS, raising=False)
    faults.point("checkpoint_write")  # nothing configured: returns at once
    monkeypatch.setenv(faults.ENV_POINTS, "artifact_publish:enospc")
    faults.point("checkpoint_write")  # configured, but not this point
    with pytest.raises(OSError) as raised:
        faults.point("artifact_publish")
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.setenv(faults.ENV_POINTS, "no_such_point:sleep")
    with pytest.raises(ValueError, match="unknown fault"):
        faults.point("checkpoint_write")


def test_an_armed_point_fires_once_and_names_its_process(monkeypatch, tmp_path):
    monkeypatch.setenv(faults.ENV_POINTS, "checkpoint_write:enospc")
    monkeypatch.setenv(faults.ENV_DIR, str(tmp_path))
    faults.point("checkpoint_write")  # not armed
    (tmp_path / "checkpoint_write").touch()
    with pytest.raises(OSError):
        faults.point("checkpoint_write")
    faults.point("checkpoint_write")  # fired already
    assert (tmp_path / "checkpoint_write.fired").read_text().isdigit()


def test_a_full_disk_while_publishing_leaves_nothing_and_fails_clearly(service, tmp_path, monkeypatch):  # noqa: F811
    from api.core.storage import get_storage

    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    key = "jobs/ftjob-x/checkpoints/step-5"
    monkeypatch.setenv(faults.ENV_POINTS, "checkpoint_write:enospc")
    with pytest.raises(OSError) as raised:
        publishing.publish_dir(get_storage(), src, key, {"job_id": "ftjob-x"}, kind="checkpoint")
    assert not get_storage().path(key).exists()
    assert not get_storage().path(key).with_name("step-5.part").exists()
    code, message, _ = pipeline.error_for(raised.value)
    assert code == "insufficient_storage" and "full" in message


@pytest.fixture
def fresh_sweep(monkeypatch):
    monkeypatch.setattr(recovery, "_shortfall_seen", False)


def test_the_sweep_resends_a_queued_job_whose_message_was_lost(service, fresh_sweep):  # noqa: F811
    job_id = service.add_job(validation=False)  # committed as queued, never enqueued: its message is "lost"
    assert waiting_messages() == 0
    # A shortfall must show on two passes in a row (a worker mid-claim shows one for a moment).
    assert recovery.redispatch_orphaned_jobs(min_age_s=0) == []
    assert recovery.redispatch_orphaned_jobs(min_age_s=0) == [job_id]
    assert waiting_messages() == 1
    # Now every waiting job has a message: nothing more is sent, however often the sweep runs.
    assert recovery.redispatch_orphaned_jobs(min_age_s=0) == []
    assert recovery.redispatch_orphaned_jobs(min_age_s=0) == []
    assert waiting_messages() == 1


def test_the_sweep_leaves_waiting_and_young_jobs_alone(service, fresh_sweep):  # noqa: F811
    enqueue_job(service.add_job(validation=False))
    for _ in range(3):
        assert recovery.redispatch_orphaned_jobs(min_age_s=0) == []
    # No message yet, but younger than the threshold: its enqueue may still be on the way.
    service.add_job(validation=False)
    for _ in range(3):
        assert recovery.redispatch_orphaned_jobs(min_age_s=3600) == []
    assert waiting_messages() == 1
