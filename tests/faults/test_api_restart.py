"""The API process is SIGKILLed and restarted while clients poll running jobs through the official `openai`
client. The client's own retries (connection errors, 5xx, Retry-After) ride out the gap: no poll fails,
no job moves backwards, and training carries on in the workers regardless.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
from openai import OpenAI

from tests.faults.checks import assert_trained_once
from tests.faults.cluster import TERMINAL, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.e2e, pytest.mark.postgres]

ORDER = {"queued": 1, "running": 2, "succeeded": 3, "failed": 3, "cancelled": 3}


class Poller(threading.Thread):
    """Polls one job until told to stop, recording every status seen and any error the client raised."""

    def __init__(self, base_url: str, job_id: str):
        super().__init__(daemon=True)
        # Enough retries (exponential backoff, capped at 8 s) to cover an API restart on a loaded machine.
        self.client = OpenAI(base_url=base_url, api_key="unused-on-loopback", max_retries=12, timeout=15)
        self.job_id = job_id
        self.seen: list[str] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                job = self.client.fine_tuning.jobs.retrieve(self.job_id)
                self.client.fine_tuning.jobs.list_events(self.job_id, limit=5)
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on
                self.errors.append(exc)
                return
            self.seen.append(job.status)
            self.stop.wait(0.2)


def test_api_restart_while_clients_poll(cluster, file_id):
    # 40 steps: long enough to still be training while the API is down.
    longer = {"n_epochs": 4, "batch_size": 4}
    jobs = []
    for i in range(2):
        response = cluster.create_job(file_id, suffix=f"api-restart-{i}", hyperparameters=longer)
        assert response.status_code == 200, response.text
        jobs.append(response.json()["id"])
    pollers = [Poller(f"{cluster.api_url}/v1", job_id) for job_id in jobs for _ in range(2)]
    for poller in pollers:
        poller.start()
    wait_until(lambda: all(p.seen for p in pollers), 60, "every poller to get an answer")
    cluster.wait_job(jobs[0], lambda j: j.status == "running", 60, "running")

    os.kill(cluster.api.pid, signal.SIGKILL)
    cluster.api.process.wait()
    at_kill = {j: cluster.job(j) for j in jobs}
    cluster.start_api()
    cluster.wait_api()
    for job_id in jobs:
        cluster.wait_terminal(job_id)
    wait_until(lambda: all(p.seen[-1] in TERMINAL or p.errors for p in pollers), 60, "the pollers to see the end")
    for poller in pollers:
        poller.stop.set()
        poller.join(timeout=60)

    # The jobs first: a job that did not succeed fails here with its error and the processes' logs.
    for job_id in jobs:
        job = assert_trained_once(cluster, job_id)
        assert job.attempt == 1, "the workers should not notice the API restart"
    for poller in pollers:
        assert not poller.errors, poller.errors
        assert poller.seen[-1] == "succeeded", poller.seen
        ranks = [ORDER[s] for s in poller.seen]
        assert ranks == sorted(ranks), f"status went backwards: {poller.seen}"
    # The job that was training when the API died went on training without it.
    assert at_kill[jobs[0]].status == "running"
