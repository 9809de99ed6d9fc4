"""One `svfit serve` (tiny Llama, SQLite, its own worker) shared by the client suites, tests/dashboard and tests/svfit_cli.

Both suites only act as clients of the public API, each in its own organization or on its own jobs, so they
can share a server: it starts once per test session instead of once per suite, and the server's one-off
costs (importing the training stack on the first upload, the worker's shutdown) are paid once.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Service, start_embedded

_service: Service | None = None


def shared_service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Service:
    """The session's client-suite server, started on first use and stopped when the session ends."""
    global _service
    if _service is None:
        service = start_embedded(tmp_path_factory.mktemp("client-suites-data"), models_dir)
        _service = service

        def stop() -> None:
            global _service
            service.stop()
            _service = None

        # The first suite to ask owns the shutdown; pytest runs it when the session ends.
        request.addfinalizer(stop)
    return _service


def cancel_unfinished(service: Service, job_id: str) -> None:
    """Cleanup for tests that start long jobs: a failed test must not leave the one worker busy for minutes."""
    response = httpx.get(f"{service.base_url}/v1/fine_tuning/jobs/{job_id}", timeout=30)
    if response.status_code == 200 and response.json()["status"] not in ("succeeded", "failed", "cancelled"):
        httpx.post(f"{service.base_url}/v1/fine_tuning/jobs/{job_id}/cancel", timeout=30)
