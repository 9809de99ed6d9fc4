"""Fixtures for end-to-end tests: real `svfit` processes on real Postgres + Redis, or the embedded default.

Each test session gets its own Postgres database, Redis database index and queue name, so runs on the
same machine never see each other's jobs.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from testkit.tiny_models import build_tiny
from testkit.databases import fresh_postgres_database
from tests.network import free_port

ROOT = Path(__file__).resolve().parents[2]
SVFIT = [sys.executable, "-m", "svfit_cli"]


@dataclass
class Service:
    """A set of running `svfit` processes and the URL their API answers on."""

    base_url: str
    env: dict[str, str]
    data_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    replicas: dict[str, str] = field(default_factory=dict)  # serving process name -> its URL

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.data_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [*SVFIT, *args], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes[name] = proc
        return proc

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"service not ready in {timeout}s:\n" + "\n".join(self.log(n) for n in self.processes))

    def start_replica(self, name: str) -> str:
        """A `svfit serving` process on a free port; returns its URL once it answers (and so has registered:
        its first heartbeat is written before it starts listening)."""
        port = free_port()
        self.start(name, "serving", "--host", "127.0.0.1", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.processes[name].returncode}:\n{self.log(name)}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{name} not ready in 60s:\n{self.log(name)}")

    def log(self, name: str) -> str:
        path = self.data_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models folder holding a tiny random chat Llama (with a chat template) as base model `tiny-llama`."""
    root = tmp_path_factory.mktemp("models")
    built = build_tiny("llama", "causal", root)
    built.rename(root / "tiny-llama")
    return root


def base_env(data_dir: Path, models_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVFIT_")}
    env.update(
        SVFIT_DATA_DIR=str(data_dir),
        SVFIT_MODELS_DIR=str(models_dir),
        SVFIT_PORT=str(port),
        SVFIT_MIN_TRAINING_EXAMPLES="4",
        SVFIT_HEARTBEAT_INTERVAL_S="0.5",
        SVFIT_SERVING_HEARTBEAT_S="0.5",
        SVFIT_PROGRESS_INTERVAL_S="0.2",
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with fresh_postgres_database("svfit_e2e", migrate=False) as url:
        yield url


@pytest.fixture(scope="module")
def production_service(tmp_path_factory, models_dir, postgres_url) -> Iterator[Service]:
    """`svfit migrate`, then `svfit api`, one `svfit worker` and two `svfit serving` replicas on Postgres +
    Redis, as production runs them (the replicas' URLs are `service.replicas`)."""
    port = free_port()
    data_dir = tmp_path_factory.mktemp("prod-data")
    env = base_env(data_dir, models_dir, port)
    env.update(
        SVFIT_DATABASE_URL=postgres_url,
        SVFIT_BROKER_URL=f"redis://127.0.0.1:6379/{secrets.randbelow(8) + 8}",
        SVFIT_WORKER_QUEUE=f"e2e-{secrets.token_hex(4)}",
        SVFIT_SERVING_TOKEN=secrets.token_urlsafe(16),
    )
    service = Service(f"http://127.0.0.1:{port}", env, data_dir)
    subprocess.run([*SVFIT, "migrate"], cwd=ROOT, env=env, check=True, capture_output=True)
    service.start("api", "api", "--host", "127.0.0.1", "--port", str(port))
    service.start("worker", "worker", "--queue", env["SVFIT_WORKER_QUEUE"])
    try:
        service.replicas = {name: service.start_replica(name) for name in ("serving-1", "serving-2")}
        service.wait_ready()
        yield service
    finally:
        service.stop()


def start_embedded(data_dir: Path, models_dir: Path) -> Service:
    """`svfit serve` on a free port over `data_dir`, answering; stopped again if it never gets ready."""
    port = free_port()
    service = Service(f"http://127.0.0.1:{port}", base_env(data_dir, models_dir, port), data_dir)
    service.start("serve", "serve", "--host", "127.0.0.1", "--port", str(port))
    try:
        service.wait_ready(timeout=90)
    except BaseException:
        service.stop()
        raise
    return service


@pytest.fixture(scope="module")
def embedded_service(tmp_path_factory, models_dir) -> Iterator[Service]:
    """`svfit serve`: SQLite + the filesystem queue + one local worker, nothing external."""
    service = start_embedded(tmp_path_factory.mktemp("embedded-data"), models_dir)
    try:
        yield service
    finally:
        service.stop()


CHAT_LINES = [
    {"messages": [{"role": "user", "content": "what is good ?"}, {"role": "assistant", "content": "good is great"}]},
    {"messages": [{"role": "user", "content": "what is bad ?"}, {"role": "assistant", "content": "bad is terrible"}]},
    {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hello . how are you ?"}]},
    {"messages": [{"role": "user", "content": "i love this movie"}, {"role": "assistant", "content": "positive"}]},
    {"messages": [{"role": "user", "content": "i hate this film"}, {"role": "assistant", "content": "negative"}]},
    {"messages": [{"role": "user", "content": "the food was great"}, {"role": "assistant", "content": "positive"}]},
    {"messages": [{"role": "user", "content": "the service was bad"}, {"role": "assistant", "content": "negative"}]},
    {"messages": [{"role": "user", "content": "is it good ?"}, {"role": "assistant", "content": "yes it is very good"}]},
]


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("datasets") / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in CHAT_LINES * 2))
    return path
