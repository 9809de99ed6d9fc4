"""Fixtures for the dashboard tests: a real `svfit serve` (tests/client_harness.py, tiny Llama), Debian's
Chromium driven by Playwright, a fresh page per test, and a screenshot of the page whenever a test fails.

The tests skip only when no Chromium binary can be found; `scripts/test` and `.ci/run` install one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.client_harness import shared_service
from tests.e2e.conftest import Service, chat_jsonl, models_dir  # noqa: F401 - fixtures

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
# Generous: the first upload makes the server import the training stack, and this machine is shared.
EXPECT_TIMEOUT_MS = 30_000


def find_chromium() -> str | None:
    explicit = os.environ.get("SVFIT_CHROMIUM")
    for candidate in ([explicit] if explicit else []) + list(CHROMIUM_CANDIDATES):
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture(scope="session")
def service(request, tmp_path_factory, models_dir) -> Service:  # noqa: F811 - the imported fixture
    return shared_service(request, tmp_path_factory, models_dir)


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install -y chromium, or set SVFIT_CHROMIUM)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        try:
            yield browser
        finally:
            browser.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ANN001, ANN201
    """On a failed test that used a page: save a screenshot and name its path in the failure report."""
    outcome = yield
    report = outcome.get_result()
    page = item.funcargs.get("page") if hasattr(item, "funcargs") else None
    if report.when != "call" or not report.failed or page is None:
        return
    folder = Path(os.environ.get("SVFIT_UI_FAILURES") or tempfile.mkdtemp(prefix="svfit-ui-failure-"))
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / f"{item.name}.png"
    try:
        page.screenshot(path=str(shot), full_page=True)
        message = f"screenshot of the page at failure: {shot} ({page.url})"
    except Exception as exc:  # noqa: BLE001 - a dead page must not hide the real failure
        message = f"no screenshot: {exc}"
    print(f"\n{message}")
    report.sections.append(("dashboard screenshot", message))


@pytest.fixture
def page(browser, service: Service):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True,
                                  base_url=service.base_url)
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def api(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{service.base_url}/v1", timeout=60) as client:
        yield client


def wait_for_status(api: httpx.Client, job_id: str, statuses: set[str], timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/fine_tuning/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"{job_id} still {job['status']}"
        time.sleep(0.3)


def upload(api: httpx.Client, path: Path) -> dict:
    with path.open("rb") as f:
        response = api.post("/files", data={"purpose": "fine-tune"}, files={"file": (path.name, f)})
    assert response.status_code == 200, response.text
    return response.json()
