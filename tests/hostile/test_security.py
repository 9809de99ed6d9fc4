"""Security properties: keys stored hashed and compared in constant time, revocation at once, malformed
credentials refused, no unsafe deserialization anywhere in the service's code, store paths that cannot
escape the store, and artifact downloads whose path and filename come from ids only.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from api.core.storage import LocalStorage
from api.core.tables import ApiKey, Base
from api.services import keys as keys_service
from api.services.keys import create_api_key, revoke_api_key
from tests.api.conftest import Api, _build_api
from tests.hostile.conftest import assert_envelope
from tests.hostile.served_models import build_models, publish_classifier

ROOT = Path(__file__).resolve().parents[2]
# The code the service runs: its packages, the benchmarks and scripts that load models.
SCANNED = ["api", "worker", "svfit_core", "migrations", "benchmarks", "scripts"]


# --- keys ----------------------------------------------------------------------------------------------


def test_api_keys_are_stored_hashed(make_api):
    api = make_api(require_auth=True)
    plaintext = api.keys["alpha"]
    secret = plaintext[len(keys_service.KEY_PREFIX):]
    with api.session() as session:
        cells = [
            str(value) for table in Base.metadata.sorted_tables for row in session.execute(select(table)).all()
            for value in row
        ]
        key_hashes = session.scalars(select(ApiKey.key_hash)).all()
    # Only the display prefix (a few characters of the secret, as OpenAI shows) is kept in clear.
    shown = 16 - len(keys_service.KEY_PREFIX)
    assert not any(plaintext in cell or secret[shown:shown + 12] in cell for cell in cells)
    assert hashlib.sha256(plaintext.encode()).hexdigest() in key_hashes


def test_keys_are_looked_up_by_hash_and_compared_in_constant_time():
    source = inspect.getsource(keys_service.authenticate)
    assert "ApiKey.key_hash == presented_hash" in source  # the query compares digests, never the key
    assert "hmac.compare_digest(" in source
    assert not re.search(r"presented_key\s*==|==\s*presented_key", source)


def test_a_revoked_key_stops_working_at_once(make_api):
    api = make_api(require_auth=True)
    headers = api.headers("alpha")
    assert api.client.get("/v1/files", headers=headers).status_code == 200
    with api.session() as session:  # as `svfit keys revoke` does, from another process
        assert revoke_api_key(session, api.keys["alpha"]) is True
    assert_envelope(api.client.get("/v1/files", headers=headers), 401, "invalid_api_key")
    assert api.client.post("/v1/files", headers=headers, files={"file": ("a", b"{}")},
                           data={"purpose": "fine-tune"}).status_code == 401
    with api.session() as session:
        assert revoke_api_key(session, api.keys["alpha"]) is False  # nothing live to revoke
        _, other = create_api_key(session, "alpha")
        key_id = session.scalars(select(ApiKey.id).where(ApiKey.key_hash == keys_service.hash_key(other))).one()
    assert api.client.get("/v1/files", headers={"Authorization": f"Bearer {other}"}).status_code == 200
    with api.session() as session:  # by id, as listed (the plaintext is gone)
        assert revoke_api_key(session, key_id) is True
    assert api.client.get("/v1/files", headers={"Authorization": f"Bearer {other}"}).status_code == 401
    assert api.client.get("/v1/files", headers=api.headers("beta")).status_code == 200  # others unaffected


@pytest.mark.parametrize(
    "authorization",
    ["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token sk-svfit-x", "Bearer sk-svfit-" + "x" * 100_000,
     "Bearer sk-svfit-\u00e9\u00e8", "Bearer  sk-svfit-doublespace", "sk-svfit-no-scheme", "Bearer local"],
    ids=["empty", "blank", "basic", "token-scheme", "huge", "non-ascii", "double-space", "no-scheme", "placeholder"],
)
def test_malformed_credentials_are_401(make_api, authorization):
    api = make_api(require_auth=True)
    response = api.client.get("/v1/files", headers={"Authorization": authorization.encode("utf-8")})
    assert_envelope(response, 401, "invalid_api_key")


# --- no unsafe deserialization ---------------------------------------------------------------------------


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            kw = {k.arg: k.value for k in node.keywords if k.arg}

            def is_true(arg: str) -> bool:  # present, and not literally False
                return arg in kw and not (isinstance(kw[arg], ast.Constant) and kw[arg].value is False)

            if name in ("torch.load", "torch.serialization.load"):
                weights_only = kw.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"{name}( without weights_only=True")
            if is_true("trust_remote_code"):
                found.append(f"{name}(trust_remote_code=...)")
            if is_true("allow_pickle"):
                found.append(f"{name}(allow_pickle=...)")
            if name.endswith("read_pickle") or name.endswith("yaml.load") or name.endswith("yaml.unsafe_load"):
                found.append(f"{name}(")
            safetensors = kw.get("use_safetensors")
            if isinstance(safetensors, ast.Constant) and safetensors.value is False:
                found.append(f"{name}(use_safetensors=False)")
    return found


def test_no_unsafe_deserialization_anywhere():
    """No pickle (or its relatives) is imported, torch.load only with weights_only=True, and no model is
    loaded with trust_remote_code: a model folder or an uploaded artifact can never run code."""
    problems = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for problem in _unsafe_calls(ast.parse(path.read_text(), filename=str(path))):
                problems.append(f"{path.relative_to(ROOT)}: {problem}")
    assert problems == []


def test_the_scan_would_see_unsafe_code():
    bad = ast.parse(
        "import pickle\nimport torch\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
        "AutoModel.from_pretrained('x', trust_remote_code=True)\nnp.load('x', allow_pickle=True)\n"
        "AutoModel.from_pretrained('x', trust_remote_code=flag)\ntorch.load('x', weights_only=True)\n"
    )
    assert len(_unsafe_calls(bad)) == 6


# --- paths ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["../escape", "/etc/passwd", "files/../../escape", "files/../../../etc/passwd", "..", "."]
)
def test_the_store_refuses_keys_that_escape_it(tmp_path, key):
    storage = LocalStorage(tmp_path / "store")
    (tmp_path / "store").mkdir()
    with pytest.raises(ValueError, match="escapes the store"):
        storage.path(key)


def test_a_symlink_in_the_store_cannot_lead_out(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "store" / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(ValueError, match="escapes the store"):
        LocalStorage(tmp_path / "store").path("link/secret")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite_template) -> Iterator[Api]:  # noqa: ANN001
    """An app whose organization alpha owns a real, exportable fine-tune (job `ftjob-clf`)."""
    root = tmp_path_factory.mktemp("security")
    models = build_models(root)
    shutil.copyfile(migrated_sqlite_template, root / "svfit.db")
    api = _build_api(root, f"sqlite:///{root / 'svfit.db'}", models_dir=models)
    publish_classifier(api.app, api.org_ids["alpha"], models)
    with api.client:
        yield api
    api.app.state.engine.dispose()


@pytest.mark.parametrize(
    ("query", "param"),
    [("format=../../../etc/passwd", "format"), ("format=svfit%00", "format"), ("format=svfit&step=-1", "step"),
     ("format=svfit&step=1%2F..%2F..", "step"), ("format=svfit&step=99", "step"),
     ("format=peft_lora&step=9223372036854775809", "step")],
    ids=["format-traversal", "format-nul", "step-negative", "step-traversal", "step-missing", "step-beyond-int64"],
)
def test_artifact_parameters_never_reach_a_path(finished: Api, query: str, param: str):
    before = sorted((finished.settings.data_dir / "store").rglob("*"))
    response = finished.client.get(f"/v1/fine_tuning/jobs/ftjob-clf/artifacts?{query}", headers=finished.headers())
    assert_envelope(response, 400, param=param)
    assert sorted((finished.settings.data_dir / "store").rglob("*")) == before


@pytest.mark.parametrize("job_id", ["..%2F..%2Fetc", "ftjob-clf%2F..%2F..", "..", "ftjob-clf%00"])
def test_artifact_job_ids_never_reach_a_path(finished: Api, job_id: str):
    response = finished.client.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts?format=svfit", headers=finished.headers())
    assert response.status_code == 404, response.text
    assert set(response.json()) == {"error"}


def test_an_artifact_download_is_named_from_ids_only(finished: Api):
    response = finished.client.get("/v1/fine_tuning/jobs/ftjob-clf/artifacts?format=svfit", headers=finished.headers())
    assert response.status_code == 200, response.text
    assert response.headers["content-disposition"] == 'attachment; filename="ftjob-clf-final-svfit.tar.gz"'
    assert response.headers["content-type"] == "application/gzip"
    assert hashlib.sha256(response.content).hexdigest() == response.headers["x-content-sha256"]
    archives = sorted(p.relative_to(finished.settings.data_dir / "store").as_posix()
                      for p in (finished.settings.data_dir / "store" / "artifacts").rglob("*.tar.gz"))
    assert archives == ["artifacts/ftjob-clf/ftjob-clf-final-svfit.tar.gz"]
