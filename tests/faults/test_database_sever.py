"""Postgres goes away (the proxy in front of it cuts every connection and refuses new ones) while a worker is
training and reporting progress, for longer than the heartbeat timeout, then comes back.

While it is down the API answers 503 with Retry-After (never a bare 500); afterwards the job finishes
exactly once, with the adapter an uninterrupted run produces.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.checks import assert_store_clean, assert_trained_once
from tests.faults.cluster import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.e2e, pytest.mark.postgres]

OUTAGE_S = 6.0  # longer than SVFIT_HEARTBEAT_TIMEOUT_S, so the job's beat is stale when the database returns


def assert_unavailable(response) -> None:  # noqa: ANN001 - httpx.Response
    assert response.status_code == 503, (response.status_code, response.text)
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "service_unavailable"


def test_database_outage_while_a_worker_reports(cluster, file_id, references, models_dir, train_jsonl):
    job_id = cluster.submit(file_id, suffix="db-outage")
    cluster.wait_job(job_id, lambda j: (j.progress or {}).get("step", 0) >= 1, 90, "reporting progress")

    cluster.proxy.sever()
    severed_at = time.monotonic()
    try:
        assert cluster.job(job_id).status == "running", "the job finished before the database went away"
        assert_unavailable(cluster.http.get(f"/fine_tuning/jobs/{job_id}"))
        assert_unavailable(cluster.http.get("/fine_tuning/jobs"))
        with train_jsonl.open("rb") as fh:
            assert_unavailable(cluster.http.post("/files", files={"file": fh}, data={"purpose": "fine-tune"}))
        assert cluster.http.get(f"{cluster.api_url}/readyz").status_code == 503
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - severed_at)))
    finally:
        cluster.proxy.restore()

    wait_until(lambda: cluster.http.get(f"/fine_tuning/jobs/{job_id}").status_code == 200, 30, "the API to recover")
    job = cluster.wait_terminal(job_id)
    assert job.status == "succeeded", (job.error, cluster.logs())
    assert_trained_once(cluster, job_id)
    assert_store_clean(cluster, job_id, models_dir)
    references.assert_matches(cluster, job_id)
