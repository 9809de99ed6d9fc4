"""The fuzzing target: the real app (auth required, SQLite, a recording dispatcher instead of a worker)
served by uvicorn on a free loopback port in a background thread, with a little data of its own (a file,
a job, a fine-tuned model) so that some generated ids hit real rows.

Run by hand, it serves until interrupted and prints the key, for a long `st run` against it:

    python -m tests.hostile.fuzz_server            # prints URL and key, Ctrl-C to stop
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from api.core.migrations import upgrade_to_head
from api.core.settings import Settings
from api.core.tables import FineTunedModel
from api.main import create_app
from api.services.keys import create_api_key

BASE_MODEL = "tiny-base"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FuzzTarget:
    base_url: str
    key: str  # organization alpha's
    other_key: str  # organization beta's
    data_dir: Path
    dispatched: list[str]

    @property
    def schema_url(self) -> str:
        return f"{self.base_url}/openapi.json"


def _seed(app, base_url: str, key: str) -> None:  # noqa: ANN001
    """One processed file, one queued job and one fine-tuned model in organization alpha."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    body = b"".join(json.dumps({"text": f"t{i}", "label": i % 2}).encode() + b"\n" for i in range(5))
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        file_id = client.post("/v1/files", files={"file": ("seed.jsonl", body)}, data={"purpose": "fine-tune"}).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={"model": BASE_MODEL, "training_file": file_id}).json()
    with app.state.sessionmaker() as session:
        session.add(FineTunedModel(
            id=f"ft:{BASE_MODEL}:{job['organization_id']}:seed:{job['id']}", org_id=job["organization_id"],
            parent=BASE_MODEL, job_id=job["id"], storage_key=f"jobs/{job['id']}/final",
        ))
        session.commit()


@contextmanager
def serve(root: Path, **overrides) -> Iterator[FuzzTarget]:  # noqa: ANN003
    """The app over `root`, listening until the block exits."""
    models = root / "models"
    (models / BASE_MODEL).mkdir(parents=True, exist_ok=True)
    (models / BASE_MODEL / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    database = root / "svfit.db"
    upgrade_to_head(f"sqlite:///{database}")
    values = dict(
        data_dir=root / "data", database_url=f"sqlite:///{database}", models_dir=models, require_auth=True,
        min_training_examples=3, max_upload_bytes=1024 * 1024, upload_chunk_bytes=64 * 1024,
    )
    values.update(overrides)
    dispatched: list[str] = []
    app = create_app(Settings(**values), dispatch=dispatched.append)
    with app.state.sessionmaker() as session:
        _, key = create_api_key(session, "alpha")
        _, other_key = create_api_key(session, "beta")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="fuzz-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fuzz server did not start")
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _seed(app, base_url, key)
        yield FuzzTarget(base_url, key, other_key, root / "data", dispatched)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.engine.dispose()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="svfit-fuzz-") as tmp, serve(Path(tmp)) as target:
        print(f"schema: {target.schema_url}\nkey:    {target.key}", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
