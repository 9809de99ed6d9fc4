"""Organization isolation, every resource by every verb: organization alpha aims at what belongs to beta.

Beta owns a file, a queued job, a succeeded job with an event, a checkpoint and a real (servable,
exportable) classification fine-tune and its checkpoint model. Every request alpha makes at one of them
must (1) answer exactly what the same request answers for an id that never existed (so existence is not
leaked: same status, code, param and message), which is a 404 wherever the id is the resource in the path,
and (2) change nothing: the database and the store are byte-for-byte the same afterwards. The same
requests from beta reach the resource (so the matrix does test something).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select

from api.core.ids import new_id
from api.core.tables import Base, Checkpoint, FineTunedModel, JobEvent
from tests.api.conftest import Api, _build_api, chat_file
from tests.hostile.served_models import LLAMA, build_models, publish_classifier


@dataclass
class World:
    api: Api
    ids: dict[str, str]  # what beta owns, by name; the same names map to never-existing ids in `ghosts`
    ghosts: dict[str, str]
    own_files: dict[str, str]  # a valid training file of each organization's own, by organization


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite_template) -> Iterator[World]:  # noqa: ANN001
    root = tmp_path_factory.mktemp("isolation")
    models = build_models(root)
    shutil.copyfile(migrated_sqlite_template, root / "svfit.db")
    api = _build_api(root, f"sqlite:///{root / 'svfit.db'}", models_dir=models, inference_batch_window_ms=0,
                     serving=True)
    beta = api.org_ids["beta"]
    with api.client:
        file_id = api.upload_ok(chat_file(5), org="beta")
        queued = api.job_ok(org="beta", model=LLAMA, training_file=file_id)["id"]
        model = publish_classifier(api.app, beta, models)
        done = "ftjob-clf"
        checkpoint_model = f"{model}:ckpt-step-1"
        api.add(
            JobEvent(id=new_id("ftevent"), job_id=done, level="info", type="message", message="done"),
            Checkpoint(id=new_id("ftckpt"), job_id=done, org_id=beta, step_number=1, metrics={},
                       fine_tuned_model_checkpoint=checkpoint_model, storage_key=f"jobs/{done}/final"),
            FineTunedModel(id=checkpoint_model, org_id=beta, parent="tiny-bert", job_id=done, step_number=1,
                           storage_key=f"jobs/{done}/final"),
        )
        with api.session() as session:
            event_id = session.scalars(select(JobEvent.id).where(JobEvent.job_id == queued)).first()
        ids = {"file": file_id, "queued": queued, "done": done, "model": model, "ckpt_model": checkpoint_model,
               "event": event_id}
        ghosts = {"file": "file-0123456789abcdef01234567", "queued": "ftjob-0123456789abcdef01234567",
                  "done": "ftjob-fedcba9876543210fedcba98", "model": f"ft:tiny-bert:{beta}:clf:ftjob-nothere",
                  "ckpt_model": f"ft:tiny-bert:{beta}:clf:ftjob-nothere:ckpt-step-1",
                  "event": "ftevent-0123456789abcdef01234567"}
        own_files = {org: api.upload_ok(chat_file(5), org=org) for org in ("alpha", "beta")}
        yield World(api, ids, ghosts, own_files)
    api.close()


# A score_model grader whose model is beta's fine-tune (no template braces: bodies go through str.format).
JUDGE = {"type": "score_model", "name": "judge", "model": "{model}", "input": [{"role": "user", "content": "x"}]}

# (resource, verb, method, url, json body, what beta itself gets). `{name}` is filled from the world's ids.
MATRIX: list[tuple[str, str, str, str, dict | None, int]] = [
    ("file", "retrieve", "GET", "/v1/files/{file}", None, 200),
    ("file", "delete", "DELETE", "/v1/files/{file}", None, 400),  # beta's own: in use by a queued job
    ("file", "list after", "GET", "/v1/files?after={file}", None, 200),
    ("file content", "download", "GET", "/v1/files/{file}/content", None, 200),
    ("file", "train on", "POST", "/v1/fine_tuning/jobs", {"model": LLAMA, "training_file": "{file}"}, 200),
    ("file", "validate on", "POST", "/v1/fine_tuning/jobs",
     {"model": LLAMA, "training_file": "OWN_FILE", "validation_file": "{file}"}, 200),
    ("job", "retrieve", "GET", "/v1/fine_tuning/jobs/{queued}", None, 200),
    ("job", "list after", "GET", "/v1/fine_tuning/jobs?after={queued}", None, 200),
    ("job", "pause", "POST", "/v1/fine_tuning/jobs/{queued}/pause", None, 200),
    ("job", "resume", "POST", "/v1/fine_tuning/jobs/{queued}/resume", None, 200),
    ("job", "cancel", "POST", "/v1/fine_tuning/jobs/{queued}/cancel", None, 200),
    ("job", "cancel finished", "POST", "/v1/fine_tuning/jobs/{done}/cancel", None, 400),
    ("events", "list", "GET", "/v1/fine_tuning/jobs/{queued}/events", None, 200),
    ("events", "list after", "GET", "/v1/fine_tuning/jobs/{queued}/events?after={event}", None, 200),
    ("checkpoints", "list", "GET", "/v1/fine_tuning/jobs/{done}/checkpoints", None, 200),
    ("artifacts", "svfit", "GET", "/v1/fine_tuning/jobs/{done}/artifacts?format=svfit", None, 200),
    ("artifacts", "peft_lora", "GET", "/v1/fine_tuning/jobs/{done}/artifacts?format=peft_lora", None, 0),
    ("artifacts", "merged", "GET", "/v1/fine_tuning/jobs/{done}/artifacts?format=merged", None, 0),
    ("artifacts", "checkpoint", "GET", "/v1/fine_tuning/jobs/{done}/artifacts?format=svfit&step=1", None, 200),
    ("model", "retrieve", "GET", "/v1/models/{model}", None, 200),
    ("model", "retrieve checkpoint", "GET", "/v1/models/{ckpt_model}", None, 200),
    ("model", "delete", "DELETE", "/v1/models/{model}", None, 0),
    ("model", "delete checkpoint", "DELETE", "/v1/models/{ckpt_model}", None, 0),
    ("inference", "classify", "POST", "/v1/classifications", {"model": "{model}", "input": "good"}, 200),
    ("inference", "classify checkpoint", "POST", "/v1/classifications", {"model": "{ckpt_model}", "input": "x"}, 200),
    ("inference", "embed", "POST", "/v1/embeddings", {"model": "{model}", "input": "good"}, 200),
    ("inference", "embed checkpoint", "POST", "/v1/embeddings", {"model": "{ckpt_model}", "input": "x"}, 200),
    ("inference", "complete", "POST", "/v1/completions", {"model": "{model}", "prompt": "x", "max_tokens": 1}, 400),
    ("inference", "chat", "POST", "/v1/chat/completions",
     {"model": "{model}", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}, 400),
    # A model grader's model: beta's own passes the check (a classifier cannot chat, so the run reports the
    # grader model's failure in a 200); alpha's naming it is a 400 naming the grader's field, as for a ghost.
    ("grader model", "validate", "POST", "/v1/fine_tuning/alpha/graders/validate", {"grader": JUDGE}, 200),
    ("grader model", "run", "POST", "/v1/fine_tuning/alpha/graders/run",
     {"grader": {"type": "multi", "name": "m", "graders": {"judge": JUDGE}, "calculate_output": "judge"},
      "model_sample": "x"}, 200),
    ("grader model", "run checkpoint", "POST", "/v1/fine_tuning/alpha/graders/run",
     {"grader": {**JUDGE, "model": "{ckpt_model}"}, "model_sample": "x"}, 200),
]


def _fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


def _request(world: World, org: str, method: str, url: str, body: dict | None, ids: dict[str, str]) -> Any:
    body = _fill(body, ids)
    if body and body.get("training_file") == "OWN_FILE":
        body["training_file"] = world.own_files[org]
    return world.api.client.request(method, _fill(url, ids), json=body, headers=world.api.headers(org))


def snapshot(api: Api) -> tuple[dict, dict]:
    """Every row of every table, and every file in the store with its digest."""
    with api.session() as session:
        rows = {
            table.name: sorted(map(repr, session.execute(select(table)).all())) for table in Base.metadata.sorted_tables
        }
    root = api.settings.data_dir / "store"
    files = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }
    return rows, files


def _comparable(response: Any, ids: dict[str, str]) -> tuple:
    """Status, code, param and message with the id it names taken out."""
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    error = body.get("error") or {}
    message = error.get("message", "")
    for value in sorted(ids.values(), key=len, reverse=True):  # a model id holds a job id: longest first
        message = message.replace(value, "<id>")
    return response.status_code, error.get("code"), error.get("param"), message


@pytest.mark.parametrize(
    ("method", "url", "body"), [row[2:5] for row in MATRIX], ids=[f"{row[0]}-{row[1]}" for row in MATRIX]
)
def test_another_organizations_resource_is_as_if_it_did_not_exist(world: World, method, url, body):  # noqa: ANN001
    before = snapshot(world.api)
    response = _request(world, "alpha", method, url, body, world.ids)
    after = snapshot(world.api)
    assert after == before, "a cross-organization request changed something"

    ghost = _request(world, "alpha", method, url, body, world.ghosts)
    assert _comparable(response, world.ids) == _comparable(ghost, world.ghosts), (response.text, ghost.text)
    assert response.status_code in (400, 404), response.text
    if "{" in url.split("?")[0]:  # the resource is in the path: 404
        assert response.status_code == 404, response.text


@pytest.mark.parametrize(
    ("method", "url", "body", "owner_status"),
    [(row[2], row[3], row[4], row[5]) for row in MATRIX if row[5]],
    ids=[f"{row[0]}-{row[1]}" for row in MATRIX if row[5]],
)
def test_the_owner_reaches_every_resource_of_the_matrix(world: World, method, url, body, owner_status):  # noqa: ANN001
    """Runs after the matrix (it changes beta's state, in table order: pause, resume, then cancel): beta's
    own requests get past the ownership check and answer what they should for the owner."""
    response = _request(world, "beta", method, url, body, world.ids)
    assert response.status_code == owner_status, response.text


def test_lists_show_nothing_of_another_organization(world: World):
    api = world.api
    files = api.client.get("/v1/files?limit=100", headers=api.headers("alpha")).json()["data"]
    jobs = api.client.get("/v1/fine_tuning/jobs?limit=100", headers=api.headers("alpha")).json()["data"]
    models = api.client.get("/v1/models", headers=api.headers("alpha")).json()["data"]
    beta = api.org_ids["beta"]
    assert all(f["id"] != world.ids["file"] for f in files)
    assert all(j["organization_id"] != beta for j in jobs)
    assert all(m["owned_by"] != beta for m in models)


def test_an_idempotency_key_is_scoped_to_its_organization(make_api):
    """Alpha reusing beta's Idempotency-Key gets its own job, never beta's (and no 'key reused' error)."""
    api = make_api()
    headers = {"Idempotency-Key": "shared-key-123"}
    beta_job = api.job_ok(org="beta", headers=headers)
    alpha = api.create_job(org="alpha", headers=headers)
    assert alpha.status_code == 200, alpha.text
    assert alpha.json()["id"] != beta_job["id"]
    assert alpha.json()["organization_id"] == api.org_ids["alpha"]
