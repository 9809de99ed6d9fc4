"""Schemathesis against a running server: every operation of the OpenAPI document fuzzed, with zero 5xx and
zero responses that break the document (status codes, content types, headers, bodies), bad input
rejected, missing auth refused, and 405s naming the methods a path really serves.

The suite runs a bounded pass (SVFIT_FUZZ_MAX_EXAMPLES per operation, default 10: well under a minute).
A long pass is the same test with a bigger number, run by hand:

    SVFIT_FUZZ_MAX_EXAMPLES=200 SVFIT_FUZZ_SEED=random pytest tests/hostile/test_schemathesis.py -s
    SVFIT_FUZZ_DATABASE=postgres ...                      # the same against a fresh PostgreSQL database
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile.fuzz_server import FuzzTarget, serve

CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "ignored_auth",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
])


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def write_config(target: FuzzTarget, path: Path) -> Path:
    """Real ids as fuzz dictionaries: half the time a path id or a body reference names a row that exists,
    so generated requests reach the logic behind the 404s."""
    lines = [f"[dictionaries.{kind}]\nvalues = {_toml_list(ids)}\n" for kind, ids in target.ids.items()]
    lines.append("[parameters]")
    for name, kind, probability in [
        ("path.job_id", "job", 0.5), ("path.file_id", "file", 0.5), ("path.model", "model", 0.5),
        ("body.model", "model", 0.5), ("body.training_file", "file", 0.5), ("body.validation_file", "file", 0.2),
    ]:
        lines.append(f'"{name}" = {{ dictionary = "{kind}", probability = {probability} }}')
    path.write_text("\n".join(lines) + "\n")
    return path


def run_schemathesis(
    target: FuzzTarget, config: Path, max_examples: int, seed: str | None
) -> subprocess.CompletedProcess:
    st = Path(sys.executable).with_name("st")  # the venv's CLI; else whatever is on PATH
    command = [
        str(st if st.exists() else shutil.which("st")), "--config-file", str(config), "run", target.schema_url,
        "--header", f"Authorization: Bearer {target.key}",
        "--checks", CHECKS,
        "--max-examples", str(max_examples),
        "--phases", "examples,coverage,fuzzing",
        "--workers", "1",
        "--request-timeout", "30",
        "--generation-database", "none",
        "--no-color",
    ]
    if seed is not None:
        command += ["--seed", seed]
    timeout = int(os.environ.get("SVFIT_FUZZ_TIMEOUT_S", "900"))
    # Run beside the config, not in the repository: schemathesis keeps a cache in its working directory.
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=config.parent)


def test_the_whole_schema_survives_fuzzing(tmp_path: Path, request: pytest.FixtureRequest):
    pytest.importorskip("schemathesis", reason="schemathesis is a dev extra: pip install -e '.[dev]'")
    max_examples = int(os.environ.get("SVFIT_FUZZ_MAX_EXAMPLES", "10"))
    seed = os.environ.get("SVFIT_FUZZ_SEED", "20261122")
    # SQLite by default; SVFIT_FUZZ_DATABASE=postgres for a fresh database on the local PostgreSQL.
    database_url = None
    if os.environ.get("SVFIT_FUZZ_DATABASE") == "postgres":
        database_url = request.getfixturevalue("postgres_database")
    with serve(tmp_path, database_url) as target:
        config = write_config(target, tmp_path / "schemathesis.toml")
        result = run_schemathesis(target, config, max_examples, None if seed == "random" else seed)
    output = result.stdout + result.stderr
    summary = re.search(r"\d+ generated.*", output)
    print(f"schemathesis, {max_examples} examples per operation: {summary.group(0) if summary else '?'}")
    assert result.returncode == 0, output[-15000:]
    assert summary and "failures" not in summary.group(0), output[-15000:]


# What the fuzzer found and what now holds without it (quick, no server).


def test_the_schema_documents_the_errors_the_api_gives(api):
    schema = api.client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)  # a bad request is a 400 in the envelope
            if path.startswith("/v1/"):
                assert {"400", "401", "404", "429", "500"} <= set(responses), (method, path)
    assert "HTTPValidationError" not in schema["components"]["schemas"]


@pytest.mark.parametrize(("path", "allowed"), [
    ("/v1/files", "GET, POST"), ("/v1/files/file-x", "DELETE, GET"), ("/v1/fine_tuning/jobs", "GET, POST"),
    ("/v1/models/ft:x:y", "DELETE, GET"), ("/v1/fine_tuning/alpha/graders/run", "POST"),
])
def test_a_405_names_every_method_of_the_path(api, path: str, allowed: str):
    response = api.client.request("PATCH", path, headers=api.headers())
    assert response.status_code == 405 and response.headers["allow"] == allowed
    assert response.json()["error"]["code"] == "method_not_allowed"
