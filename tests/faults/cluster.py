"""The service the fault tests break: `svfit api` and `svfit worker` processes on a fresh Postgres database
reached through a TcpProxy and on a private Redis, plus what the tests share to drive and inspect it
(the HTTP client, database reads that bypass the proxy, waits, and fault arming for worker/faults.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, select, update
from sqlalchemy.pool import NullPool

from api.core.tables import Checkpoint, FineTunedModel, Job, JobEvent
from tests.faults.redis_server import RedisServer
from tests.faults.tcp_proxy import TcpProxy
from tests.network import free_port
from tests.worker.conftest import ROOT, WorkerProcess, chat_examples

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
BASE_MODEL = "tiny-llama"

# 40 examples, batch 4, 2 epochs: 20 steps, a checkpoint every 5 (the last one at step 20).
N_EXAMPLES, TOTAL_STEPS, CHECKPOINT_EVERY = 40, 20, 5
JOB_BODY: dict[str, Any] = {
    "model": BASE_MODEL,
    "seed": 1234,
    "hyperparameters": {"n_epochs": 2, "batch_size": 4},
    "peft": {"type": "svfit", "rank": 4, "max_seq_length": 32, "checkpoint_every": CHECKPOINT_EVERY},
}
# Every worker of the cluster has these points live; each stays inert until a test arms it (Cluster.arm).
FAULT_POINTS = "checkpoint_write:sleep,artifact_publish:sleep"
# `svfit worker` with every step slowed (tests/worker/slow_worker.py), so a run lasts long enough to be hit.
SLOW_WORKER = str(ROOT / "tests" / "worker" / "slow_worker.py")
STEP_DELAY_S = "0.1"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.1) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def training_file(path: Path) -> Path:
    path.write_text("".join(json.dumps(example) + "\n" for example in chat_examples(N_EXAMPLES)))
    return path


class Cluster:
    """One service instance; processes are started, killed and restarted by the tests."""

    def __init__(self, root: Path, models_dir: Path, database_url: str, proxy: TcpProxy, redis: RedisServer):
        self.root = root
        self.data_dir = root / "data"
        self.fault_dir = root / "faults"
        self.fault_dir.mkdir(parents=True, exist_ok=True)
        self.proxy = proxy
        self.redis = redis
        self.queue = f"faults-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}"
        self.api: WorkerProcess | None = None
        self.workers: list[WorkerProcess] = []
        self._started = 0
        # Reads go straight to Postgres, never through the proxy, so they work while the service's link is cut.
        self.db = create_engine(database_url, poolclass=NullPool)
        proxied = database_url.replace(":5432/", f":{proxy.port}/")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SVFIT_")}
        env.update(
            PYTHONPATH=str(ROOT),
            OMP_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            SVFIT_DATA_DIR=str(self.data_dir),
            SVFIT_MODELS_DIR=str(models_dir),
            SVFIT_DATABASE_URL=proxied,
            SVFIT_BROKER_URL=redis.url,
            SVFIT_WORKER_QUEUE=self.queue,
            SVFIT_SERVING_TOKEN="faults-serving-token",
            SVFIT_PORT=str(self.port),
            SVFIT_MIN_TRAINING_EXAMPLES="4",
            SVFIT_HEARTBEAT_INTERVAL_S="0.25",
            # Generous for a loaded 2-core machine: a live worker must never look dead.
            SVFIT_HEARTBEAT_TIMEOUT_S="4",
            SVFIT_PROGRESS_INTERVAL_S="0.2",
            SVFIT_CONTROL_POLL_INTERVAL_S="0.2",
            SVFIT_REDISPATCH_AFTER_S="2",
            SVFIT_FAULT_INJECT=FAULT_POINTS,
            SVFIT_FAULT_DIR=str(self.fault_dir),
            SVFIT_TEST_STEP_DELAY_S=STEP_DELAY_S,
        )
        self.env = env
        self.http = httpx.Client(base_url=f"{self.api_url}/v1", timeout=30)

    # --- processes -------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> WorkerProcess:
        self._started += 1
        return WorkerProcess(self.root / f"{self._started:02d}-{name}.log", argv, self.env)

    def start_api(self) -> WorkerProcess:
        self.api = self._spawn("api", [sys.executable, "-m", "svfit_cli", "api", "--loglevel", "warning"])
        return self.api

    def wait_api(self, timeout: float = 90.0) -> None:
        def up() -> bool:
            if self.api.process.poll() is not None:
                raise AssertionError(f"svfit api exited:\n{self.api.log()[-4000:]}")
            try:
                return httpx.get(f"{self.api_url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout, "svfit api to answer", poll=0.2)

    def start_worker(self) -> WorkerProcess:
        worker = self._spawn("worker", [sys.executable, SLOW_WORKER, "worker", "--loglevel", "info"])
        self.workers.append(worker)
        return worker

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.process.poll() is None]

    def worker_with_pid(self, pid: int) -> WorkerProcess:
        [worker] = [w for w in self.workers if w.pid == pid]
        return worker

    def heal(self, n_workers: int = 2) -> None:
        """Bring every part back up (a previous test may have left one down) and wait until it answers."""
        if not self.redis.running:
            self.redis.start()
        self.proxy.restore()
        if self.api is None or self.api.process.poll() is not None:
            self.start_api()
        self.workers = self.live_workers()
        fresh = [self.start_worker() for _ in range(n_workers - len(self.workers))]
        self.wait_api()
        for worker in fresh:
            worker.wait_ready(timeout=120)

    def stop(self) -> None:
        for proc in [*self.workers, self.api]:
            if proc is not None:
                proc.terminate()
        for proc in [*self.workers, self.api]:
            if proc is not None and not proc._log.closed:
                proc.stop(timeout=20)
        self.http.close()
        self.db.dispose()

    # --- faults ----------------------------------------------------------------------------------------

    def arm(self, point: str) -> None:
        """Make the next worker that reaches `point` stop there (worker/faults.py)."""
        (self.fault_dir / point).touch()

    def disarm(self) -> None:
        for path in self.fault_dir.iterdir():
            path.unlink()

    def fired_pid(self, point: str) -> int | None:
        fired = self.fault_dir / f"{point}.fired"
        text = fired.read_text().strip() if fired.exists() else ""
        return int(text) if text else None

    # --- the API ---------------------------------------------------------------------------------------

    def upload(self, path: Path) -> str:
        with path.open("rb") as fh:
            response = self.http.post("/files", files={"file": (path.name, fh)}, data={"purpose": "fine-tune"})
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def create_job(self, file_id: str, suffix: str, **overrides: Any) -> httpx.Response:
        return self.http.post("/fine_tuning/jobs", json={**JOB_BODY, "training_file": file_id, "suffix": suffix, **overrides})

    def submit(self, file_id: str, suffix: str) -> str:
        response = self.create_job(file_id, suffix)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    # --- the database, read directly ---------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        with self.db.connect() as conn:
            row = conn.execute(select(Job.__table__).where(Job.id == job_id)).one()
        return Job(**row._mapping)

    def rows(self, table, *where) -> list:  # noqa: ANN001 - a mapped class
        with self.db.connect() as conn:
            return [table(**r._mapping) for r in conn.execute(select(table.__table__).where(*where))]

    def messages(self, job_id: str) -> list[str]:
        events = self.rows(JobEvent, JobEvent.job_id == job_id)
        return [e.message for e in sorted(events, key=lambda e: e.pk)]

    def wait_job(self, job_id: str, predicate: Callable[[Job], bool], timeout: float, what: str) -> Job:
        def check() -> Job | None:
            job = self.job(job_id)
            return job if predicate(job) else None

        try:
            return wait_until(check, timeout, f"job {job_id} to be {what}", poll=0.1)
        except AssertionError as exc:
            job = self.job(job_id)
            raise AssertionError(f"{exc}: status={job.status} progress={job.progress} error={job.error}\n"
                                 f"{self.logs()}") from None

    def wait_terminal(self, job_id: str, timeout: float = 150.0) -> Job:
        return self.wait_job(job_id, lambda j: j.status in TERMINAL, timeout, "finished")

    def unfinished_jobs(self) -> list[str]:
        return [j.id for j in self.rows(Job, Job.status.not_in(TERMINAL))]

    def cancel_unfinished(self) -> None:
        """Leave no job behind for the next test (the API's cancel waits on a worker; this does not)."""
        with self.db.begin() as conn:
            conn.execute(update(Job).where(Job.status.not_in(TERMINAL)).values(status="cancelled"))

    def store_root(self) -> Path:
        return self.data_dir / "store"

    def logs(self, tail: int = 3000) -> str:
        procs = [p for p in [self.api, *self.workers] if p is not None]
        return "\n".join(f"--- {p.log_path.name} (pid {p.pid}) ---\n{p.log()[-tail:]}" for p in procs)

    def model_rows(self, job_id: str) -> list[FineTunedModel]:
        return self.rows(FineTunedModel, FineTunedModel.job_id == job_id)

    def checkpoint_rows(self, job_id: str) -> list[Checkpoint]:
        return self.rows(Checkpoint, Checkpoint.job_id == job_id)
