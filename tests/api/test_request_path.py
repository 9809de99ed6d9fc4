"""The polled read path: what one `GET /v1/fine_tuning/jobs/{id}` costs the database, that every request
hands its connection back to the pool, and that the job's queue position agrees with the list's.

Clients that follow a job poll it once or twice a second, so its query count is part of the contract a
benchmark target rests on (benchmarks/service.py); these tests keep it from growing back unnoticed.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import event, update

from api.core import gc_pauses
from api.core.tables import Job


@contextmanager
def statements(api) -> Iterator[list[str]]:
    """The SQL statements the app's engine runs inside the block."""
    seen: list[str] = []

    def record(_conn, _cursor, statement, _params, _context, _many) -> None:  # SQLAlchemy's event signature
        seen.append(statement)

    engine = api.app.state.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_retrieving_a_job_is_one_query_plus_one_for_a_key(any_db_api):
    api = any_db_api
    with_key = api.job_ok()["id"]
    without_key = api.job_ok(org=None)["id"]
    api.client.get(f"/v1/fine_tuning/jobs/{without_key}")  # the default organization's id is read once

    with statements(api) as seen:
        assert api.client.get(f"/v1/fine_tuning/jobs/{without_key}").status_code == 200
    assert len(seen) == 1, seen
    with statements(api) as seen:
        assert api.client.get(f"/v1/fine_tuning/jobs/{with_key}", headers=api.headers()).status_code == 200
    assert len(seen) == 2, seen  # the key is looked up on every request, so a revoked key stops at once


def test_every_request_hands_its_connection_back(any_db_api):
    api = any_db_api
    job_id = api.job_ok()["id"]
    pool = api.app.state.engine.pool
    for path in (f"/v1/fine_tuning/jobs/{job_id}", f"/v1/fine_tuning/jobs/{job_id}/events", "/v1/files",
                 "/v1/fine_tuning/jobs/ftjob-missing", "/readyz"):
        api.client.get(path, headers=api.headers())
        assert pool.checkedout() == 0, path


def test_a_jobs_queue_position_is_the_same_read_alone_or_in_the_list(any_db_api):
    api = any_db_api
    training_file = api.upload_ok()
    ids = [api.job_ok(training_file=training_file, seed=i)["id"] for i in range(4)]
    other_org = api.job_ok(org="beta")["id"]  # queued after ours: every organization shares the workers
    with api.session() as session:
        session.execute(update(Job).where(Job.id == ids[1]).values(status="running"))
        session.commit()

    def position(job_id: str, org: str = "alpha") -> int | None:
        return api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=api.headers(org)).json()["queue_position"]

    page = api.client.get("/v1/fine_tuning/jobs", headers=api.headers()).json()["data"]
    listed = {job["id"]: job["queue_position"] for job in page}
    assert listed == {i: position(i) for i in ids} == {ids[0]: 1, ids[1]: None, ids[2]: 2, ids[3]: 3}
    assert position(other_org, "beta") == 4


def test_long_lived_objects_leave_the_collectors_view_at_start_up_and_after_the_training_library(make_api):
    gc.unfreeze()
    gc_pauses._frozen_after.clear()
    try:
        api = make_api()
        assert gc.get_freeze_count() == 0  # nothing is frozen by building the app, only by starting it
        with api.client:
            assert gc_pauses._frozen_after == {"start-up"}
            at_start = gc.get_freeze_count()
            assert at_start > 10_000
            api.upload_ok()  # validation uses the training library
            assert gc_pauses._frozen_after == {"start-up", "training library"}
            assert gc.get_freeze_count() >= at_start
            # What a full collection still walks is what the requests left, not the imports.
            assert len(gc.get_objects()) < at_start
    finally:
        gc.unfreeze()
