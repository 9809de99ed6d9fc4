"""Models listing/deletion, authentication, organization isolation on every resource, and the error envelope."""

from __future__ import annotations

import pytest

from api.core.ids import new_id
from api.core.tables import Checkpoint, FineTunedModel
from api.services.keys import revoke_api_key
from tests.api.conftest import BASE_MODEL


def _fine_tune(api, org: str = "alpha") -> tuple[str, str]:
    job_id = api.job_ok(org=org)["id"]
    org_id = api.org_ids[org]
    model_id = f"ft:{BASE_MODEL}:{org_id}:sfx:{job_id[-12:]}"
    api.add(FineTunedModel(id=model_id, org_id=org_id, parent=BASE_MODEL, job_id=job_id, storage_key=f"jobs/{job_id}/final"))
    return job_id, model_id


def test_models_list_get_delete(any_db_api):
    api = any_db_api
    _, model_id = _fine_tune(api)
    listing = api.client.get("/v1/models", headers=api.headers()).json()
    assert listing["object"] == "list"
    by_id = {m["id"]: m for m in listing["data"]}
    assert by_id[BASE_MODEL]["owned_by"] == "system"
    assert by_id[model_id] == {
        "id": model_id, "object": "model", "created": by_id[model_id]["created"],
        "owned_by": api.org_ids["alpha"], "parent": BASE_MODEL,
    }
    # Ids with ':' (and '/', below) route through {model:path}.
    assert api.client.get(f"/v1/models/{model_id}", headers=api.headers()).json()["id"] == model_id
    assert api.client.delete(f"/v1/models/{model_id}", headers=api.headers()).json() == {
        "id": model_id, "object": "model", "deleted": True,
    }
    assert api.client.get(f"/v1/models/{model_id}", headers=api.headers()).status_code == 404
    assert model_id not in {m["id"] for m in api.client.get("/v1/models", headers=api.headers()).json()["data"]}
    assert api.client.delete(f"/v1/models/{model_id}", headers=api.headers()).status_code == 404


def test_base_models_cannot_be_deleted_and_slash_ids_resolve(api, tmp_path):
    response = api.client.delete(f"/v1/models/{BASE_MODEL}", headers=api.headers())
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
    nested = api.settings.models_dir / "acme" / "tiny-2"
    nested.mkdir(parents=True)
    (nested / "config.json").write_text("{}")
    assert api.client.get("/v1/models/acme/tiny-2", headers=api.headers()).json()["owned_by"] == "system"
    missing = api.client.get("/v1/models/acme/none", headers=api.headers())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_every_resource_of_another_org_answers_404(any_db_api):
    api = any_db_api
    job_id, model_id = _fine_tune(api, org="beta")
    file_id = api.upload_ok(org="beta")
    api.add(Checkpoint(
        id=new_id("ftckpt"), job_id=job_id, org_id=api.org_ids["beta"], step_number=1, metrics={},
        fine_tuned_model_checkpoint=f"{model_id}:ckpt-step-1", storage_key="x",
    ))
    jobs = f"/v1/fine_tuning/jobs/{job_id}"
    requests = [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
        ("GET", jobs),
        ("POST", f"{jobs}/cancel"),
        ("POST", f"{jobs}/pause"),
        ("POST", f"{jobs}/resume"),
        ("GET", f"{jobs}/events"),
        ("GET", f"{jobs}/checkpoints"),
        ("GET", f"{jobs}/artifacts?step=1"),
        ("GET", f"/v1/models/{model_id}"),
        ("DELETE", f"/v1/models/{model_id}"),
    ]
    for method, url in requests:
        response = api.client.request(method, url, headers=api.headers("alpha"))
        assert response.status_code == 404, (method, url, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    # Lists show nothing of the other organization either, and nothing was changed.
    assert api.client.get("/v1/files", headers=api.headers("alpha")).json()["data"] == []
    assert api.client.get("/v1/fine_tuning/jobs", headers=api.headers("alpha")).json()["data"] == []
    assert model_id not in {m["id"] for m in api.client.get("/v1/models", headers=api.headers("alpha")).json()["data"]}
    assert api.client.get(jobs, headers=api.headers("beta")).json()["status"] == "queued"
    assert api.client.get(f"/v1/files/{file_id}", headers=api.headers("beta")).status_code == 200


def test_no_key_acts_as_the_default_org_when_auth_is_off(api):
    file_id = api.upload_ok(org=None)
    assert api.client.get(f"/v1/files/{file_id}").status_code == 200
    assert api.client.get(f"/v1/files/{file_id}", headers=api.headers("alpha")).status_code == 404
    job = api.job_ok(org=None, training_file=file_id)
    assert job["organization_id"] not in api.org_ids.values()


def test_a_presented_key_of_ours_is_always_checked(api):
    for headers in ({"Authorization": "Bearer sk-svfit-wrong"}, {"Authorization": "Basic dXNlcjpwYXNz"}):
        response = api.client.get("/v1/files", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_a_placeholder_key_acts_as_the_default_org_when_auth_is_off(api):
    """The openai client insists on some key; "local" must work against the loopback default."""
    file_id = api.upload_ok(org=None)
    response = api.client.get(f"/v1/files/{file_id}", headers={"Authorization": "Bearer local"})
    assert response.status_code == 200


def test_a_placeholder_key_is_refused_when_auth_is_on(make_api):
    api = make_api(require_auth=True)
    response = api.client.get("/v1/files", headers={"Authorization": "Bearer local"})
    assert response.status_code == 401


EMPTY_BEARERS = ["Bearer ", "Bearer", "bearer   ", "Bearer \t "]


@pytest.mark.parametrize("header", EMPTY_BEARERS)
def test_an_empty_bearer_key_is_no_key(api, header):
    """lm-evaluation-harness sends `Bearer ` when OPENAI_API_KEY is unset: on the loopback default, no key."""
    file_id = api.upload_ok(org=None)
    assert api.client.get(f"/v1/files/{file_id}", headers={"Authorization": header}).status_code == 200


@pytest.mark.parametrize("header", EMPTY_BEARERS)
def test_an_empty_bearer_key_is_refused_when_auth_is_on(make_api, header):
    api = make_api(require_auth=True)
    response = api.client.get("/v1/files", headers={"Authorization": header})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_auth_required_refuses_missing_and_revoked_keys(make_api):
    api = make_api(require_auth=True)
    response = api.client.get("/v1/files")
    assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    assert api.client.get("/v1/files", headers=api.headers("alpha")).status_code == 200
    with api.session() as session:
        assert revoke_api_key(session, api.keys["alpha"]) is True
    assert api.client.get("/v1/files", headers=api.headers("alpha")).status_code == 401


@pytest.mark.parametrize(
    ("method", "url", "status", "code"),
    [
        ("GET", "/v1/no/such/route", 404, "unknown_url"),
        ("DELETE", "/v1/fine_tuning/jobs", 405, "method_not_allowed"),
        ("GET", "/v1/fine_tuning/jobs?limit=1000", 400, "invalid_parameter"),
        ("POST", "/v1/fine_tuning/jobs", 400, "missing_parameter"),
    ],
)
def test_framework_errors_use_the_envelope(api, method, url, status, code):
    response = api.client.request(method, url, headers=api.headers())
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and "detail" not in response.text


def test_validation_errors_name_the_field_path(api):
    response = api.client.post("/v1/fine_tuning/jobs", json={"model": BASE_MODEL}, headers=api.headers())
    assert response.json()["error"]["param"] == "training_file"
    response = api.client.post(
        "/v1/fine_tuning/jobs", json={"model": BASE_MODEL, "training_file": "f", "metadata": {"k": 1}}, headers=api.headers()
    )
    assert response.json()["error"]["param"] == "metadata.k"
    response = api.client.post(
        "/v1/fine_tuning/jobs", content=b"{not json", headers={**api.headers(), "Content-Type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] is None
    response = api.client.post("/v1/files", data={"purpose": "fine-tune"}, headers=api.headers())
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"


def test_unknown_body_keys_are_ignored(api):
    job = api.job_ok(integrations=[], some_future_field={"x": 1})
    assert job["status"] == "queued"


def test_unexpected_errors_are_500_without_internals(api):
    @api.app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internal detail")

    response = api.client.get("/boom")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "secret" not in response.text and "Traceback" not in response.text


def test_health_probes_and_docs(api):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").json() == {"status": "ok", "serving_replicas": 0}
    assert api.client.get("/docs").status_code == 200
    paths = api.client.get("/openapi.json").json()["paths"]
    assert "/v1/fine_tuning/jobs/{job_id}/artifacts" in paths and "/v1/models/{model}" in paths


def test_readyz_is_503_when_the_database_is_gone(api):
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    unreachable = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/gone", connect_args={"connect_timeout": 2})
    api.app.state.sessionmaker = sessionmaker(bind=unreachable)
    response = api.client.get("/readyz")
    assert response.status_code == 503 and response.json()["error"]["code"] == "service_unavailable"
    assert api.client.get("/healthz").status_code == 200
