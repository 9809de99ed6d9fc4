"""The fuzzing target: the real app (auth required, SQLite, a recording dispatcher instead of a worker)
served by uvicorn on a free loopback port in a background thread, with real tiny models (so inference
requests that name one run generation) and a little data of its own (a file, a job, a classification
fine-tune), whose ids the fuzzer mixes into what it generates.

Run by hand, it serves until interrupted and prints the key, for a long `st run` against it:

    python -m tests.hostile.fuzz_server            # prints URL and key, Ctrl-C to stop
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from api.core.migrations import upgrade_to_head
from api.core.settings import Settings
from api.main import create_app
from serving.embedded import ReplicaThread
from api.services.keys import create_api_key
from tests.hostile.served_models import LLAMA, build_models, publish_classifier
from tests.network import free_port


@dataclass
class FuzzTarget:
    base_url: str
    key: str  # organization alpha's
    data_dir: Path
    ids: dict[str, list[str]]  # real ids by kind ("file", "job", "model"), for the fuzzer's dictionaries

    @property
    def schema_url(self) -> str:
        return f"{self.base_url}/openapi.json"


def _seed(app, base_url: str, key: str, models_dir: Path) -> dict[str, list[str]]:  # noqa: ANN001
    """A processed file, a queued job and a classification fine-tune in organization alpha."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    body = b"".join(
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}).encode()
        + b"\n"
        for i in range(5)
    )
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        upload = client.post("/v1/files", files={"file": ("seed.jsonl", body)}, data={"purpose": "fine-tune"})
        file_id = upload.json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={"model": LLAMA, "training_file": file_id}).json()
    classifier = publish_classifier(app, job["organization_id"], models_dir)
    return {"file": [file_id], "job": [job["id"], "ftjob-clf"], "model": [LLAMA, classifier]}


@contextmanager
def serve(root: Path, database_url: str | None = None, **overrides) -> Iterator[FuzzTarget]:  # noqa: ANN003
    """The app over `root` (on a migrated `database_url`, default a new SQLite file), listening until the
    block exits."""
    models = build_models(root)
    if database_url is None:
        database_url = f"sqlite:///{root / 'svfit.db'}"
        upgrade_to_head(database_url)
    values = dict(
        data_dir=root / "data", database_url=database_url, models_dir=models, require_auth=True,
        min_training_examples=3, max_upload_bytes=1024 * 1024, upload_chunk_bytes=64 * 1024,
        inference_batch_window_ms=0, serving_token="fuzz-serving-token",
    )
    values.update(overrides)
    settings = Settings(**values)
    app = create_app(settings, dispatch=lambda job_id: None)
    replica = ReplicaThread(settings).start()
    with app.state.sessionmaker() as session:
        _, key = create_api_key(session, "alpha")

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
        ids = _seed(app, base_url, key, models)
        yield FuzzTarget(base_url, key, root / "data", ids)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        replica.stop()
        app.state.engine.dispose()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="svfit-fuzz-") as tmp, serve(Path(tmp)) as target:
        print(f"schema: {target.schema_url}\nkey:    {target.key}\nids:    {json.dumps(target.ids)}", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
