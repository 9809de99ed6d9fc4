"""Fixtures for the client CLI tests: a real `svfit serve` (tests/client_harness.py, tiny Llama) and a way to run
`svfit ...` against it as a user would: a subprocess with its own HOME (so no real config file leaks in)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.client_harness import shared_service
from tests.e2e.conftest import ROOT, SVFIT, Service, chat_jsonl, models_dir  # noqa: F401 - fixtures

CLI_TIMEOUT_S = 180


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self):  # noqa: ANN201
        return json.loads(self.stdout)


Run = Callable[..., Result]


def client_env(service: Service, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVFIT_") and k != "XDG_CONFIG_HOME"}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), SVFIT_API_BASE=f"{service.base_url}/v1", **extra)
    return env


@pytest.fixture(scope="session")
def service(request, tmp_path_factory, models_dir) -> Service:  # noqa: F811 - the imported fixture
    return shared_service(request, tmp_path_factory, models_dir)


@pytest.fixture
def svfit(service: Service, tmp_path: Path) -> Run:
    """`svfit(*args, env={...}, cwd=...)` runs the CLI against the test server and returns its Result."""
    home = tmp_path / "home"
    home.mkdir()

    def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
        completed = subprocess.run(
            [*SVFIT, *args], cwd=cwd or tmp_path, env=client_env(service, home, **(env or {})),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
        )
        return Result(completed.returncode, completed.stdout, completed.stderr)

    run.home = home  # type: ignore[attr-defined]
    return run
