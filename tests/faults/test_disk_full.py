"""The artifact store runs out of space, under `svfit serve` (the embedded mode: SQLite, filesystem queue,
one worker) with its store on a 2 MiB tmpfs that the test fills.

An upload then answers 507 with a clear message and leaves neither a row nor a partial file; a job fails
with `insufficient_storage` when it tries to publish, leaving nothing half-written and no row pointing at
a missing artifact. Freeing space is all it takes to work again. Without permission to mount (not root),
the publishing case injects ENOSPC through worker/faults.py instead and the upload case is skipped.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Service, base_env
from tests.faults.cluster import JOB_BODY, TERMINAL, wait_until
from tests.network import free_port

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.e2e]


class Store:
    """The service's store folder, on its own small tmpfs when `mounted`."""

    def __init__(self, root: Path, mounted: bool):
        self.root = root
        self.mounted = mounted
        self.filler = root / "filler"

    def fill(self) -> None:
        """Write until the filesystem refuses even one more byte."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def torn(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.name.endswith(".part")]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[tuple[Service, Store]]:
    data_dir = tmp_path_factory.mktemp("disk-full")
    root = data_dir / "store"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)], capture_output=True
    ).returncode == 0
    port = free_port()
    env = base_env(data_dir, models_dir, port)
    if not mounted:
        env["SVFIT_FAULT_INJECT"] = "checkpoint_write:enospc"
    service = Service(f"http://127.0.0.1:{port}", env, data_dir)
    service.start("serve", "serve", "--host", "127.0.0.1", "--port", str(port))
    try:
        service.wait_ready(timeout=120)
        yield service, Store(root, mounted)
    finally:
        service.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(root)], check=False)


def upload(client: httpx.Client, path: Path) -> httpx.Response:
    with path.open("rb") as fh:
        return client.post("/files", files={"file": (path.name, fh)}, data={"purpose": "fine-tune"})


def test_upload_to_a_full_store_is_refused_cleanly(embedded, train_jsonl):
    service, store = embedded
    if not store.mounted:
        pytest.skip("mounting a tmpfs needs root")
    with httpx.Client(base_url=f"{service.base_url}/v1", timeout=60) as client:
        before = client.get("/files").json()["data"]
        store.fill()
        try:
            refused = upload(client, train_jsonl)
            assert refused.status_code == 507, refused.text
            error = refused.json()["error"]
            assert error["code"] == "insufficient_storage" and "out of space" in error["message"]
            assert client.get("/files").json()["data"] == before
            assert not store.torn()
        finally:
            store.free()
        assert upload(client, train_jsonl).status_code == 200


def test_publishing_to_a_full_store_fails_the_job_clearly(embedded, train_jsonl):
    service, store = embedded
    with httpx.Client(base_url=f"{service.base_url}/v1", timeout=60) as client:
        uploaded = upload(client, train_jsonl)
        assert uploaded.status_code == 200, uploaded.text
        if store.mounted:
            store.fill()
        try:
            created = client.post(
                "/fine_tuning/jobs", json={**JOB_BODY, "training_file": uploaded.json()["id"], "suffix": "disk-full"}
            )
            assert created.status_code == 200, created.text
            job_id = created.json()["id"]
            job = wait_until(
                lambda: (lambda j: j if j["status"] in TERMINAL else None)(
                    client.get(f"/fine_tuning/jobs/{job_id}").json()
                ),
                120,
                "the job to finish",
                poll=0.2,
            )
            assert job["status"] == "failed", (job, service.log("serve"))
            assert job["error"]["code"] == "insufficient_storage"
            assert "full" in job["error"]["message"]
            assert job["fine_tuned_model"] is None
            assert not store.torn()
            # Nothing was recorded as published, so nothing points at a missing artifact.
            assert client.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"] == []
            assert not any(job_id[6:18] in m["id"] for m in client.get("/models").json()["data"])
        finally:
            store.free()
