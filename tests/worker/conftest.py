"""Fixtures for the worker tests: an isolated data dir and database per test, a tiny random Llama registered
as a base model, job and file factories, and helpers to run real `celery worker` subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select

from testkit.tiny_models import build_tiny
from testkit.databases import fresh_postgres_database

ROOT = Path(__file__).resolve().parents[2]

BASE_MODEL = "tiny-llama"

# Short, fast jobs: 40 examples, batch 4, 2 epochs = 20 steps, a checkpoint every 5.
N_EXAMPLES = 40
HYPERPARAMETERS = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0, "learning_rate": 5e-2}
PEFT = {"type": "svfit", "rank": 4, "max_seq_length": 32, "checkpoint_every": 5, "warmup_ratio": 0.1}

SUBJECTS = "movie film book food service".split()
OPINIONS = ["good", "bad", "great", "terrible"]


def chat_examples(n: int = N_EXAMPLES, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        subject, opinion = SUBJECTS[i % len(SUBJECTS)], OPINIONS[(i // 2) % len(OPINIONS)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"what is the {subject} like ?"},
                    {"role": "assistant", "content": f"the {subject} is very {opinion} ."},
                ]
            }
        )
    return rows


def preference_examples(n: int = N_EXAMPLES, offset: int = 0) -> list[dict]:
    """OpenAI's preference format (a DPO job's data): the chat examples' answers preferred over a curt one."""
    rows = []
    for example in chat_examples(n, offset):
        user, assistant = example["messages"]
        rows.append({
            "input": {"messages": [user]},
            "preferred_output": [assistant],
            "non_preferred_output": [{"role": "assistant", "content": "no ."}],
        })
    return rows


def prompt_examples(n: int = N_EXAMPLES, offset: int = 0) -> list[dict]:
    """OpenAI's reinforcement format (a reinforcement job's data): the chat examples' questions, each with the
    opinion a grader looks for in the answer."""
    return [{"messages": [example["messages"][0]], "opinion": OPINIONS[(i // 2) % len(OPINIONS)]}
            for i, example in enumerate(chat_examples(n, offset), start=offset)]


def worker_env(**overrides: str) -> dict[str, str]:
    """The environment of the current test (SVFIT_* set by `service`) plus overrides, for subprocesses."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(overrides)
    return env


def clear_caches() -> None:
    from api.core.db import get_engine, get_sessionmaker
    from api.core.settings import get_settings
    from worker.celery_app import get_app

    if get_engine.cache_info().currsize:
        get_engine().dispose()
    for cached in (get_settings, get_engine, get_sessionmaker, get_app):
        cached.cache_clear()


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Tiny models on a shared 2-core machine: intra-op threads only spin against each other (a 32-wide
    # linear takes ~2 ms with two threads under load, ~30 µs with one). Subprocess workers get
    # OMP_NUM_THREADS=1 for the same reason.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny("llama", "causal", tmp_path_factory.mktemp("base-models"))


class Service:
    """One isolated service instance: data dir, database, base model, and row factories."""

    def __init__(self, root: Path, database_url: str):
        self.root = root
        self.database_url = database_url

    @property
    def settings(self):  # noqa: ANN201
        from api.core.settings import get_settings

        return get_settings()

    def session(self):  # noqa: ANN201
        from api.core.db import session_scope

        return session_scope()

    def add_file(self, examples: list[dict] | bytes, *, org_id: str = "org-test", status: str = "processed") -> str:
        from api.core.ids import new_id
        from api.core.storage import get_storage
        from api.core.tables import File

        file_id = new_id("file")
        key = f"files/{file_id}.jsonl"
        body = examples if isinstance(examples, bytes) else "".join(json.dumps(e) + "\n" for e in examples).encode()
        path = get_storage().path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        with self.session() as session:
            session.add(
                File(
                    id=file_id, org_id=org_id, filename="train.jsonl", purpose="fine-tune", bytes=len(body),
                    status=status, data_format="chat", storage_key=key,
                    num_examples=None if isinstance(examples, bytes) else len(examples),
                )
            )
        return file_id

    def add_job(self, *, training_file: str | None = None, validation: bool = True, **overrides: Any) -> str:
        from api.core.ids import new_id
        from api.core.tables import Job

        training_file = training_file or self.add_file(chat_examples())
        validation_file = self.add_file(chat_examples(8, offset=3)) if validation else None
        job_id = new_id("ftjob")
        values: dict[str, Any] = dict(
            id=job_id, org_id="org-test", model=BASE_MODEL, training_file=training_file,
            validation_file=validation_file, suffix="unit", seed=1234, hyperparameters=dict(HYPERPARAMETERS),
            method={"type": "supervised"}, peft=dict(PEFT), status="queued", result_files=[],
        )
        values.update(overrides)
        with self.session() as session:
            session.add(Job(**values))
        return job_id

    def job(self, job_id: str):  # noqa: ANN201
        from api.core.tables import Job

        with self.session() as session:
            return session.scalars(select(Job).where(Job.id == job_id)).one()

    def update_job(self, job_id: str, **values: Any) -> None:
        from sqlalchemy import update

        from api.core.tables import Job

        with self.session() as session:
            session.execute(update(Job).where(Job.id == job_id).values(**values))

    def events(self, job_id: str) -> list:
        from api.core.tables import JobEvent

        with self.session() as session:
            return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.pk)))

    def rows(self, table, **where: Any) -> list:  # noqa: ANN001
        with self.session() as session:
            stmt = select(table)
            for column, value in where.items():
                stmt = stmt.where(getattr(table, column) == value)
            return list(session.scalars(stmt))

    def store_path(self, key: str) -> Path:
        from api.core.storage import get_storage

        return get_storage().path(key)

    def wait_for(self, job_id: str, predicate: Callable[[Any], bool], timeout: float, poll: float = 0.02):  # noqa: ANN201
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if predicate(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting on job {job_id}: status={job.status} progress={job.progress}")
            time.sleep(poll)


def _configure(monkeypatch: pytest.MonkeyPatch, root: Path, tiny: Path, database_url: str, **extra: str) -> None:
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / BASE_MODEL).symlink_to(tiny, target_is_directory=True)
    env = {
        "SVFIT_DATA_DIR": str(root / "data"),
        "SVFIT_DATABASE_URL": database_url,
        "SVFIT_MODELS_DIR": str(models),
        "SVFIT_PROGRESS_INTERVAL_S": "0",
        "SVFIT_CONTROL_POLL_INTERVAL_S": "0",
        "SVFIT_HEARTBEAT_INTERVAL_S": "0.25",
        "SVFIT_HEARTBEAT_TIMEOUT_S": "30",
        "SVFIT_WORKER_QUEUE": f"test-{uuid.uuid4().hex[:8]}",
        # Subprocess workers: keep torch from oversubscribing the two shared cores.
        "OMP_NUM_THREADS": "1",
    }
    env.update(extra)
    for name in [n for n in os.environ if n.startswith("SVFIT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    clear_caches()


@pytest.fixture
def service(tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """An isolated SQLite-backed service with the schema created from the tables."""
    from api.core.db import get_engine
    from api.core.tables import Base

    url = f"sqlite:///{tmp_path / 'svfit.db'}"
    _configure(monkeypatch, tmp_path, tiny_llama, url)
    Base.metadata.create_all(get_engine())
    yield Service(tmp_path, url)
    clear_caches()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, migrated Postgres database, dropped afterwards."""
    try:
        with fresh_postgres_database("svfit_test") as url:
            yield url
    finally:
        clear_caches()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database for the broker; the test's queue keys are deleted afterwards."""
    redis = pytest.importorskip("redis")
    url = "redis://127.0.0.1:6379/11"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis is not reachable: {exc}")
    yield url
    queue = os.environ.get("SVFIT_WORKER_QUEUE", "")
    if queue.startswith("test-"):
        for key in client.scan_iter(match=f"*{queue}*"):
            client.delete(key)


@pytest.fixture
def configure(tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Service]:
    """Build a service on a given database URL and extra settings (for the subprocess tests)."""

    def _make(database_url: str, *, migrate: bool = True, **extra: str) -> Service:
        _configure(monkeypatch, tmp_path, tiny_llama, database_url, **extra)
        if migrate:
            from api.core.migrations import upgrade_to_head

            upgrade_to_head(database_url)
        return Service(tmp_path, database_url)

    yield _make
    clear_caches()


class WorkerProcess:
    """A `celery worker` subprocess (through `svfit worker`, or a test launcher), logging to a file."""

    def __init__(self, log_path: Path, argv: list[str], env: dict[str, str]):
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while "ready." not in self.log():
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.1)

    def terminate(self) -> None:
        """Ask for a warm shutdown without waiting (stop several workers in parallel)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> None:
        self.terminate()
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._log.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def _start(*, launcher: str | None = None, **env: str) -> WorkerProcess:
        script = [str(Path(__file__).parent / launcher)] if launcher else ["-m", "svfit_cli"]
        argv = [sys.executable, *script, "worker", "--loglevel", "info"]
        worker = WorkerProcess(tmp_path / f"worker-{len(workers)}.log", argv, worker_env(**env))
        workers.append(worker)
        return worker

    yield _start
    for worker in workers:
        worker.terminate()
    for worker in workers:
        if not worker._log.closed:
            worker.stop()
