"""The `svfit` command: migrate, the API's refusal of an un-migrated database, keys, and `serve` starting
and stopping its embedded worker."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from svfit_cli import main
from svfit_cli.server import visible_gpus, worker_slots
from tests.network import free_port
from tests.worker.conftest import ROOT, clear_caches, worker_env


@pytest.fixture
def fresh(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    for name in [n for n in os.environ if n.startswith("SVFIT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SVFIT_DATA_DIR", str(tmp_path / "data"))
    clear_caches()
    yield tmp_path
    clear_caches()


def test_api_refuses_an_unmigrated_database_until_migrate(fresh, capsys):
    from api.core.db import get_engine
    from api.core.migrations import is_up_to_date

    assert main(["api"]) == 2
    assert "svfit migrate" in capsys.readouterr().err
    assert main(["migrate"]) == 0
    assert "database at head" in capsys.readouterr().out
    assert is_up_to_date(get_engine())


def test_keys_create_prints_the_key_once_and_revoke_by_id(fresh, capsys):
    from sqlalchemy import select

    from api.core.db import session_scope
    from api.core.tables import ApiKey

    assert main(["migrate"]) == 0
    capsys.readouterr()
    assert main(["keys", "create", "--org", "acme"]) == 0
    out = capsys.readouterr().out
    [key] = [line.split()[-1] for line in out.splitlines() if line.startswith("api key:")]
    assert key.startswith("sk-") and out.count(key) == 1
    with session_scope() as session:
        key_id = session.scalars(select(ApiKey.id)).one()
    assert main(["keys", "revoke", key_id]) == 0
    assert main(["keys", "revoke", key]) == 1, "already revoked"


def test_parser_rejects_zero_concurrency(fresh):
    with pytest.raises(SystemExit):
        main(["worker", "--concurrency", "0"])


@pytest.mark.parametrize("gpus", ["0,x", "0,0", "-1", "0,,1"])
def test_parser_rejects_bad_gpu_lists(fresh, gpus):
    with pytest.raises(SystemExit):
        main(["worker", "--gpus", gpus])


def test_worker_slots_one_per_gpu_or_round_robin():
    assert worker_slots([], None) == [("worker 1/1", {})]
    assert worker_slots([], 2) == [("worker 1/2", {}), ("worker 2/2", {})]
    assert worker_slots(["0", "1"], None) == [
        ("worker 1/2 on GPU 0", {"CUDA_VISIBLE_DEVICES": "0"}),
        ("worker 2/2 on GPU 1", {"CUDA_VISIBLE_DEVICES": "1"}),
    ]
    dealt = [env["CUDA_VISIBLE_DEVICES"] for _, env in worker_slots(["2", "3"], 5)]
    assert dealt == ["2", "3", "2", "3", "2"]


def test_visible_gpus_name_the_devices_this_process_was_given(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == ["0", "1"]
    # Pinned to physical GPUs 2 and 3 itself: its children must name those, not 0 and 1.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert visible_gpus() == []


class Supervisor:
    """A running `svfit` command that starts worker processes, and the worker pids it has printed."""

    def __init__(self, tmp_path, *args: str):  # noqa: ANN001
        self.data_dir = tmp_path / "data"
        env = worker_env(SVFIT_DATA_DIR=str(self.data_dir), OMP_NUM_THREADS="1")
        for name in [n for n in env if n.startswith("SVFIT_") and n != "SVFIT_DATA_DIR"]:
            del env[name]
        self.log = tmp_path / f"{args[0]}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "svfit_cli", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def worker_pids(self, label: str = "worker") -> list[int]:
        marker = f"  {label + ':':<10} pid "
        return [int(part.split()[0]) for part in self.text().split(marker)[1:]]

    def kill_all(self) -> None:
        """Teardown: the command and every worker it printed, whatever state the test left them in."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in re.findall(r" pid (\d+)", self.text()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


class Serve(Supervisor):
    """A running `svfit serve`."""

    def __init__(self, tmp_path):  # noqa: ANN001
        self.port = free_port()
        super().__init__(tmp_path, "serve", "--host", "127.0.0.1", "--port", str(self.port))

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.2)


@pytest.fixture
def serve(tmp_path):  # noqa: ANN001, ANN201
    running = Serve(tmp_path)
    try:
        running.wait_healthy()
        yield running
    finally:
        running.kill_all()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child that has exited but not yet been reaped by `serve` still answers signal 0.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_serve_runs_api_and_a_worker_and_stops_the_worker_on_exit(serve, stop_signal):
    text = serve.text()
    assert "auth:      off (bound to loopback)" in text
    assert f"data:      {serve.data_dir}" in text
    [worker_pid] = serve.worker_pids()
    assert alive(worker_pid)

    serve.process.send_signal(stop_signal)
    assert serve.process.wait(timeout=60) == 0, serve.text()
    assert not alive(worker_pid)


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().partition("=")[::2] for item in f.read().split(b"\0") if item)


@pytest.mark.slow
def test_serve_and_its_worker_log_no_progress_bars(serve):
    for pid in (serve.process.pid, *serve.worker_pids()):
        assert environ(pid).get("TQDM_DISABLE") == "1", pid
    probe = (
        "from svfit_cli.server import _quiet_progress_bars; _quiet_progress_bars();"
        "from tqdm.auto import tqdm; from transformers.utils import logging;"
        "print(tqdm(range(2)).disable, logging.is_progress_bar_enabled())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"], out.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_serve_starts_another_worker_when_its_worker_dies(serve):
    [first] = serve.worker_pids()
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while len(serve.worker_pids()) < 2:
        assert time.monotonic() < deadline, serve.text()
        time.sleep(0.2)
    second = serve.worker_pids()[1]
    assert second != first and alive(second) and not alive(first)
    assert "worker exited with code -9" in serve.text()

    serve.process.send_signal(signal.SIGTERM)
    assert serve.process.wait(timeout=60) == 0, serve.text()
    assert not alive(second)
    assert len(serve.worker_pids()) == 2, "a worker was started after serve was asked to stop"


@pytest.mark.slow
def test_worker_concurrency_restarts_a_dead_child_and_stops_them_all(fresh):
    assert main(["migrate"]) == 0  # the workers' reapers read the jobs table
    workers = Supervisor(fresh, "worker", "--concurrency", "2")
    try:
        deadline = time.monotonic() + 30
        while not (workers.worker_pids("worker 1/2") and workers.worker_pids("worker 2/2")):
            assert workers.process.poll() is None and time.monotonic() < deadline, workers.text()
            time.sleep(0.2)
        [first] = workers.worker_pids("worker 1/2")
        [other] = workers.worker_pids("worker 2/2")
        os.kill(first, signal.SIGKILL)
        while len(workers.worker_pids("worker 1/2")) < 2:
            assert time.monotonic() < deadline + 30, workers.text()
            time.sleep(0.2)
        replacement = workers.worker_pids("worker 1/2")[1]
        assert "worker 1/2 exited with code -9" in workers.text()
        assert alive(replacement) and alive(other) and not alive(first)
        assert workers.worker_pids("worker 2/2") == [other], "only the dead child is replaced"

        workers.process.send_signal(signal.SIGTERM)
        assert workers.process.wait(timeout=90) == 0, workers.text()
        assert not alive(replacement) and not alive(other)
    finally:
        workers.kill_all()


@pytest.mark.slow
def test_worker_gpus_pins_one_child_to_each_gpu_and_stops_them_all(fresh):
    # No GPU is needed: the children are ordinary workers whose environment names their GPU.
    assert main(["migrate"]) == 0  # the workers' reapers read the jobs table
    workers = Supervisor(fresh, "worker", "--gpus", "0,1")
    try:
        labels = ("worker 1/2 on GPU 0", "worker 2/2 on GPU 1")
        deadline = time.monotonic() + 30
        while not all(workers.worker_pids(label) for label in labels):
            assert workers.process.poll() is None and time.monotonic() < deadline, workers.text()
            time.sleep(0.2)
        pids = [workers.worker_pids(label)[0] for label in labels]
        assert [environ(pid).get("CUDA_VISIBLE_DEVICES") for pid in pids] == ["0", "1"]
        assert all(alive(pid) for pid in pids)

        workers.process.send_signal(signal.SIGTERM)
        assert workers.process.wait(timeout=90) == 0, workers.text()
        assert not any(alive(pid) for pid in pids)
    finally:
        workers.kill_all()


def test_api_and_serving_refuse_to_start_without_the_serving_token(fresh, capsys):
    assert main(["migrate"]) == 0
    capsys.readouterr()
    assert main(["api"]) == 2
    assert "SVFIT_SERVING_TOKEN" in capsys.readouterr().err
    assert main(["serving", "--port", "1"]) == 2
    assert "SVFIT_SERVING_TOKEN" in capsys.readouterr().err
