"""The `svfit` command: migrate, the API's refusal of an un-migrated database, keys, and `serve` starting
and stopping its embedded worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from api.cli import main
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


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_serve_runs_api_and_a_worker_and_stops_the_worker_on_exit(tmp_path, stop_signal):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = worker_env(SVFIT_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    for name in [n for n in env if n.startswith("SVFIT_") and n != "SVFIT_DATA_DIR"]:
        del env[name]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert serve.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert "auth:      off (bound to loopback)" in text
        assert f"data:      {tmp_path / 'data'}" in text
        worker_pid = int(text.split("worker:    pid ")[1].split()[0])
        os.kill(worker_pid, 0)  # alive

        serve.send_signal(stop_signal)
        assert serve.wait(timeout=60) == 0, log.read_text()
        with pytest.raises(ProcessLookupError):
            os.kill(worker_pid, 0)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
