"""Fixtures for the API tests: an app per test over its own data dir, on SQLite or on a fresh PostgreSQL
database, with a recording dispatcher instead of a worker, two organizations with keys, and helpers for
uploads and rows the worker would write.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from api.core.migrations import upgrade_to_head  # noqa: E402
from api.core.settings import Settings  # noqa: E402
from api.main import create_app  # noqa: E402
from api.services.keys import create_api_key  # noqa: E402
from testkit.databases import empty_database, fresh_postgres_database

BASE_MODEL = "tiny-base"
MIN_EXAMPLES = 3


def chat_line(i: int = 0) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def jsonl(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def chat_file(n: int = 5) -> bytes:
    return jsonl([chat_line(i) for i in range(n)])


def preference_line(i: int = 0) -> dict:
    """One example of OpenAI's preference format (what a DPO job trains on)."""
    return {
        "input": {"messages": [{"role": "user", "content": f"question {i}"}]},
        "preferred_output": [{"role": "assistant", "content": f"a helpful answer {i}"}],
        "non_preferred_output": [{"role": "assistant", "content": f"no {i}"}],
    }


def preference_file(n: int = 5) -> bytes:
    return jsonl([preference_line(i) for i in range(n)])


def prompt_line(i: int = 0) -> dict:
    """One example of OpenAI's reinforcement format: the conversation to answer, and a field a grader reads."""
    return {"messages": [{"role": "user", "content": f"question {i}"}], "answer": f"answer {i}"}


def prompt_file(n: int = 5) -> bytes:
    return jsonl([prompt_line(i) for i in range(n)])


class RecordingDispatch:
    """Stands in for worker.dispatch.enqueue_job: remembers ids, or fails on demand."""

    def __init__(self) -> None:
        self.job_ids: list[str] = []
        self.fail = False

    def __call__(self, job_id: str) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.job_ids.append(job_id)


@dataclass
class Api:
    """One app under test and what the tests need around it."""

    app: FastAPI
    client: TestClient
    settings: Settings
    dispatch: RecordingDispatch
    keys: dict[str, str] = field(default_factory=dict)  # org name -> plaintext key
    org_ids: dict[str, str] = field(default_factory=dict)  # org name -> org id
    replica: Any = None  # the serving replica (a thread of this process) inference routes to, when asked for

    def close(self) -> None:
        if self.replica is not None:
            self.replica.stop()
        self.app.state.engine.dispose()

    def headers(self, org: str | None = "alpha") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[org]}"} if org else {}

    def session(self) -> Session:
        return self.app.state.sessionmaker()

    def add(self, *rows: Any) -> None:
        with self.session() as session:
            session.add_all(rows)
            session.commit()

    def upload(self, body: bytes, *, org: str | None = "alpha", filename: str = "train.jsonl", purpose: str = "fine-tune"):  # noqa: ANN201
        return self.client.post(
            "/v1/files",
            headers=self.headers(org),
            files={"file": (filename, body, "application/jsonl")},
            data={"purpose": purpose},
        )

    def upload_ok(self, body: bytes | None = None, *, org: str | None = "alpha") -> str:
        response = self.upload(body if body is not None else chat_file(), org=org)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "processed", response.json()
        return response.json()["id"]

    def create_job(self, *, org: str | None = "alpha", headers: dict[str, str] | None = None, **body: Any):  # noqa: ANN201
        body.setdefault("model", BASE_MODEL)
        if "training_file" not in body:
            body["training_file"] = self.upload_ok(org=org)
        return self.client.post("/v1/fine_tuning/jobs", json=body, headers={**self.headers(org), **(headers or {})})

    def job_ok(self, **body: Any) -> dict:
        response = self.create_job(**body)
        assert response.status_code == 200, response.text
        return response.json()

    def store_files(self) -> list[Path]:
        root = self.settings.data_dir / "store"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _make_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    models_dir = overrides.pop("models_dir", None)
    if models_dir is None:
        # Job creation only checks that the base model exists: a folder with a config.json is one.
        models_dir = tmp_path / "models"
        (models_dir / BASE_MODEL).mkdir(parents=True, exist_ok=True)
        (models_dir / BASE_MODEL / "config.json").write_text('{"model_type": "llama"}')
    values: dict[str, Any] = dict(
        data_dir=tmp_path / "data",
        database_url=database_url,
        models_dir=models_dir,
        require_auth=False,
        min_training_examples=MIN_EXAMPLES,
        max_upload_bytes=256 * 1024,
        upload_chunk_bytes=4096,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def migrated_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file, copied per test: migrating each test's database would cost seconds."""
    path = tmp_path_factory.mktemp("template") / "svfit.db"
    upgrade_to_head(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for the session, migrated with upgrade_to_head and dropped afterwards."""
    with fresh_postgres_database("svfit_test") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes this runs on SQLite and on PostgreSQL (one migrated database for the session,
    emptied before each test)."""
    if request.param == "sqlite":
        path = tmp_path / "svfit.db"
        shutil.copyfile(request.getfixturevalue("migrated_sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("postgres_database")
    empty_database(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path, migrated_sqlite_template: Path) -> str:
    path = tmp_path / "svfit.db"
    shutil.copyfile(migrated_sqlite_template, path)
    return f"sqlite:///{path}"


def _build_api(tmp_path: Path, database_url: str, *, serving: bool = False, **overrides: Any) -> Api:
    """An app over its own data directory; with `serving`, a serving replica too, for inference to reach."""
    if serving:
        overrides.setdefault("serving_token", "test-serving-token")
    settings = _make_settings(tmp_path, database_url, **overrides)
    dispatch = RecordingDispatch()
    app = create_app(settings, dispatch=dispatch)
    client = TestClient(app, raise_server_exceptions=False)
    api = Api(app=app, client=client, settings=settings, dispatch=dispatch)
    if serving:
        from serving.embedded import ReplicaThread

        api.replica = ReplicaThread(settings).start()
    with api.session() as session:
        for org in ("alpha", "beta"):
            org_id, key = create_api_key(session, org)
            api.keys[org], api.org_ids[org] = key, org_id
    return api


@pytest.fixture
def make_api(tmp_path: Path, sqlite_url: str) -> Iterator[Callable[..., Api]]:
    """An Api on SQLite with settings overridden (auth required, smaller limits...)."""
    built: list[Api] = []

    def _make(**overrides: Any) -> Api:
        api = _build_api(tmp_path / f"app{len(built)}", sqlite_url, **overrides)
        built.append(api)
        return api

    yield _make
    for api in built:
        api.client.close()
        api.close()


@pytest.fixture
def api(tmp_path: Path, sqlite_url: str) -> Iterator[Api]:
    built = _build_api(tmp_path, sqlite_url)
    with built.client:
        yield built
    built.app.state.engine.dispose()


@pytest.fixture
def any_db_api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    """Like `api`, once on SQLite and once on PostgreSQL."""
    built = _build_api(tmp_path, database_url)
    with built.client:
        yield built
    built.app.state.engine.dispose()
