"""The upload corpus against the real app: every hostile body, request and filename.

- Bad training data is accepted as a file in status "error" whose status_details name each bad line; it
  stores exactly one row and its bytes (nothing half-written), and it cannot start a job.
- A bad request is a 4xx in the error envelope and leaves no bytes in the store and no row.
- A hostile filename is cleaned for display, served back in a safe Content-Disposition, and never
  becomes part of a storage path (keys are built from generated ids only).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from sqlalchemy import select

from api.core.tables import File
from tests.api.conftest import BASE_MODEL, Api, _build_api
from tests.hostile.conftest import assert_envelope, row_counts, store_entries
from tests.hostile.corpus.content import CONTENT_CASES, FILES_DIR, ContentCase
from tests.hostile.corpus.requests import (
    FILENAME_CASES,
    MULTIPART,
    REQUEST_CASES,
    FilenameCase,
    RequestCase,
    good_body,
    upload_body,
)

STORAGE_KEY = re.compile(r"^files/org-[0-9a-f]+/file-[0-9a-f]+\.jsonl$")
# What status_details may grow to, whatever the file: 20 reported problems of at most 300 characters.
MAX_DETAILS_CHARS = 8_000


@pytest.fixture(scope="module")
def apps(
    tmp_path_factory: pytest.TempPathFactory, migrated_sqlite_template: Path
) -> Iterator[Callable[..., Api]]:
    """One app per distinct settings, shared by the cases that use them (building one per case costs more
    than the case): each case checks what *it* added to the store and the tables, against a snapshot."""
    built: dict[tuple, Api] = {}

    def app_for(**settings: Any) -> Api:
        key = tuple(sorted(settings.items()))
        if key not in built:
            root = tmp_path_factory.mktemp("corpus")
            shutil.copyfile(migrated_sqlite_template, root / "svfit.db")
            built[key] = _build_api(root, f"sqlite:///{root / 'svfit.db'}", **settings)
        return built[key]

    yield app_for
    for api in built.values():
        api.client.close()
        api.app.state.engine.dispose()


@dataclass(frozen=True)
class Snapshot:
    store: frozenset[Path]
    files: frozenset[str]
    rows: tuple

    @classmethod
    def of(cls, api: Api) -> "Snapshot":
        with api.session() as session:
            files = frozenset(session.scalars(select(File.id)))
        return cls(frozenset(store_entries(api)), files, tuple(sorted(row_counts(api).items())))


def assert_stored_exactly(api: Api, before: Snapshot, body: bytes) -> File:
    """Exactly one new row, and exactly its bytes added to the store under an id-built key (no `.part`)."""
    after = Snapshot.of(api)
    (file_id,) = after.files - before.files
    with api.session() as session:
        row = session.scalars(select(File).where(File.id == file_id)).one()
    assert STORAGE_KEY.match(row.storage_key), row.storage_key
    assert after.store - before.store == {api.app.state.storage.path(row.storage_key)}
    stored = api.app.state.storage.path(row.storage_key).read_bytes()
    assert row.bytes == len(body) and stored == body
    assert row.sha256 == hashlib.sha256(body).hexdigest()
    return row


def test_every_corpus_file_has_a_case():
    on_disk = {p.stem for p in FILES_DIR.glob("*.jsonl")}
    assert on_disk <= {case.name for case in CONTENT_CASES}


def test_the_corpus_is_large_enough():
    assert len(CONTENT_CASES) + len(REQUEST_CASES) + len(FILENAME_CASES) >= 30


@pytest.mark.parametrize("case", CONTENT_CASES, ids=lambda case: case.name)
def test_bad_content_is_an_error_file_naming_its_lines(apps, case: ContentCase):  # noqa: ANN001
    api = apps(**case.settings)
    body = case.body()
    before = Snapshot.of(api)
    started = time.perf_counter()
    response = api.upload(body)
    elapsed = time.perf_counter() - started

    assert response.status_code == 200, response.text[:500]
    file = response.json()
    assert file["status"] == case.status, file["status_details"][:2000]
    for fragment in case.details:
        assert fragment in file["status_details"], (fragment, file["status_details"][:2000])
    assert len(file["status_details"]) < MAX_DETAILS_CHARS
    if case.max_seconds is not None:
        assert elapsed < case.max_seconds, f"{case.name} took {elapsed:.1f}s"
    assert assert_stored_exactly(api, before, body).filename == "train.jsonl"

    jobs_before = len(api.dispatch.job_ids)
    job = api.client.post(
        "/v1/fine_tuning/jobs", json={"model": BASE_MODEL, "training_file": file["id"]}, headers=api.headers()
    )
    if case.status == "processed":
        assert job.status_code == 200, job.text
        return
    assert_envelope(job, 400, "invalid_training_file", "training_file")
    good = api.upload_ok()
    as_validation = api.client.post(
        "/v1/fine_tuning/jobs",
        json={"model": BASE_MODEL, "training_file": good, "validation_file": file["id"]},
        headers=api.headers(),
    )
    assert_envelope(as_validation, 400, "invalid_training_file", "validation_file")
    assert len(api.dispatch.job_ids) == jobs_before


@pytest.mark.parametrize("case", REQUEST_CASES, ids=lambda case: case.name)
def test_bad_upload_requests_are_4xx_and_leave_nothing(apps, case: RequestCase):  # noqa: ANN001
    api = apps(**case.settings)
    headers = {**api.headers(), **case.extra_headers}
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    body = case.body()
    content = (body[i:i + 65536] for i in range(0, len(body), 65536)) if case.chunked else body
    before = Snapshot.of(api)
    response = api.client.post("/v1/files", content=content, headers=headers)
    assert_envelope(response, case.status, case.code, case.param)
    assert Snapshot.of(api) == before
    assert not any(p.name.endswith(".part") for p in store_entries(api))


def _disposition_filename(header: str) -> str:
    """The one filename a Content-Disposition carries; fails on anything but a single safe parameter."""
    assert not re.search(r"[\x00-\x1f\x7f]", header), header
    quoted = re.fullmatch(r'attachment; filename="([^"\\]*)"', header)
    if quoted:
        return quoted.group(1)
    extended = re.fullmatch(r"attachment; filename\*=utf-8''([A-Za-z0-9%._~!*'()-]*)", header)
    assert extended, header
    return unquote(extended.group(1), errors="strict")


@pytest.mark.parametrize("case", FILENAME_CASES, ids=lambda case: case.name)
def test_hostile_filenames_are_cleaned_and_never_a_path(apps, case: FilenameCase):  # noqa: ANN001
    api = apps()
    before = Snapshot.of(api)
    response = api.client.post(
        "/v1/files", content=upload_body(case.filename), headers={**api.headers(), "Content-Type": MULTIPART}
    )
    assert response.status_code == 200, response.text
    file = response.json()
    assert file["filename"] == case.shown and file["status"] == "processed"
    row = assert_stored_exactly(api, before, good_body())
    assert row.storage_key == f"files/{api.org_ids['alpha']}/{file['id']}.jsonl"

    download = api.client.get(f"/v1/files/{file['id']}/content", headers=api.headers())
    assert download.status_code == 200 and download.content == good_body()
    assert _disposition_filename(download.headers["content-disposition"]) == case.shown
    assert download.headers["content-type"] == "application/octet-stream"


def test_many_file_parts_keep_one_file(apps):  # noqa: ANN001
    """Two `file` parts: one file is stored (the last, as Starlette's form keeps), never two or a mix."""
    api = apps()
    before = Snapshot.of(api)
    response = api.client.post(
        "/v1/files",
        headers=api.headers(),
        files=[("file", ("a.jsonl", good_body(3))), ("file", ("b.jsonl", good_body(4)))],
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200
    assert_stored_exactly(api, before, good_body(4))
