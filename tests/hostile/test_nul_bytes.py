"""NUL characters in every string a request can carry to the database, on SQLite and PostgreSQL. SQLite
stores them; PostgreSQL's text type refuses them outright. Never a 500: a NUL in an id is no such object
(or a value that cannot be used); in a metadata value or a list filter it is just text (JSON escapes it)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.api.conftest import Api, _build_api
from testkit.databases import empty_database

NUL = "\x00"  # in JSON bodies; in URLs it travels percent-encoded (%00)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def nul_api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One app per database for the whole table: every case is a lookup or a refused write."""
    root = tmp_path_factory.mktemp(f"nul-{request.param}")
    if request.param == "sqlite":
        shutil.copyfile(request.getfixturevalue("migrated_sqlite_template"), root / "svfit.db")
        url = f"sqlite:///{root / 'svfit.db'}"
    else:
        url = request.getfixturevalue("postgres_database")
        empty_database(url)
    api = _build_api(root, url, serving=True)
    with api.client:
        yield api
    api.close()


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("GET", "/v1/files/file-%00", None),
        ("GET", "/v1/files?after=file-%00", None),
        ("GET", "/v1/files?purpose=fine%00", None),
        ("GET", "/v1/files/file-%00/content", None),
        ("DELETE", "/v1/files/file-%00", None),
        ("GET", "/v1/fine_tuning/jobs/ftjob-%00", None),
        ("GET", "/v1/fine_tuning/jobs?after=ftjob-%00", None),
        ("POST", "/v1/fine_tuning/jobs/ftjob-%00/cancel", None),
        ("GET", "/v1/fine_tuning/jobs/ftjob-%00/events?after=x%00", None),
        ("GET", "/v1/fine_tuning/jobs/ftjob-%00/artifacts", None),
        ("GET", "/v1/models/ft:%00", None),
        ("DELETE", "/v1/models/ft:%00", None),
        ("POST", "/v1/fine_tuning/jobs", {"model": "tiny-base", "training_file": f"file-{NUL}"}),
        ("POST", "/v1/fine_tuning/jobs", {"model": f"tiny{NUL}", "training_file": "file-x"}),
        ("POST", "/v1/fine_tuning/jobs", {"model": "tiny-base", "training_file": "TRAINING", "metadata": {"k": NUL}}),
        ("POST", "/v1/fine_tuning/jobs", {"model": "tiny-base", "training_file": "TRAINING", "metadata": {NUL: "v"}}),
        ("POST", "/v1/fine_tuning/jobs", {"model": "tiny-base", "training_file": "TRAINING", "suffix": NUL}),
        ("POST", "/v1/fine_tuning/jobs",
         {"model": "tiny-base", "training_file": "TRAINING", "peft": {"target_modules": [f"q{NUL}"]}}),
        ("POST", "/v1/completions", {"model": f"ft:{NUL}", "prompt": "x"}),
        ("POST", "/v1/classifications", {"model": f"ft:{NUL}", "input": "x"}),
        ("POST", "/v1/fine_tuning/alpha/graders/validate", {"grader": {
            "type": "score_model", "name": "s", "model": f"ft:{NUL}", "input": [{"role": "user", "content": "x"}]}}),
        ("POST", "/v1/fine_tuning/alpha/graders/run", {"model_sample": NUL, "grader": {
            "type": "string_check", "name": NUL, "input": "{{sample.output_text}}", "reference": NUL,
            "operation": "eq"}}),
    ],
)
def test_nul_characters_never_cause_a_server_error(nul_api: Api, method, url, body):  # noqa: ANN001
    api = nul_api
    if body and body.get("training_file") == "TRAINING":
        body = {**body, "training_file": api.upload_ok()}
    response = api.client.request(method, url, json=body, headers=api.headers())
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}
