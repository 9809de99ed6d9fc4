"""Files: upload and validation of each format and each kind of error, size limit, listing, content, delete."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from api.core.tables import File
from tests.api.conftest import chat_file, chat_line, jsonl, preference_line

GOOD_FILES = {
    "chat": jsonl([chat_line(i) for i in range(4)]),
    "completion": jsonl([{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(4)]),
    "classification": jsonl([{"text": f"t{i}", "label": i % 2} for i in range(4)]),
    "classification_pair": jsonl([{"text": f"a{i}", "text_pair": f"b{i}", "label": 1} for i in range(4)]),
    "preference": jsonl([preference_line(i) for i in range(4)]),
}


@pytest.mark.parametrize("data_format", sorted(GOOD_FILES))
def test_upload_of_each_format_is_processed(api, data_format):
    response = api.upload(GOOD_FILES[data_format])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert body["status"] == "processed"
    assert body["bytes"] == len(GOOD_FILES[data_format])
    assert body["filename"] == "train.jsonl" and body["purpose"] == "fine-tune"
    with api.session() as session:
        row = session.scalars(select(File)).one()
    assert (row.data_format, row.num_examples) == (data_format, 4)


def test_upload_on_both_databases_round_trips_content(any_db_api):
    body = chat_file(3)
    file_id = any_db_api.upload_ok(body)
    assert any_db_api.client.get(f"/v1/files/{file_id}/content", headers=any_db_api.headers()).content == body


def test_crlf_lines_and_final_line_without_newline_are_fine(api):
    body = b"\r\n".join(json.dumps(chat_line(i)).encode() for i in range(3))
    assert api.upload(body).json()["status"] == "processed"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"{not json", "invalid JSON"),
        (b'{"foo": 1}', "unknown format"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"text": "x", "label": "positive"}', "'label' must be an integer"),
        (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 0}]}',
         "no trainable assistant turn"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "unknown role"),
        (b"", "blank line"),
        (b'{"text": "caf\xe9", "label": 0}', "not valid UTF-8"),
    ],
)
def test_each_validation_error_is_reported_with_its_line_number(api, line, expected):
    # The bad line is line 3 of a file that is otherwise valid classification data.
    good = [json.dumps({"text": f"t{i}", "label": 0}).encode() for i in range(4)]
    body = b"\n".join([good[0], good[1], line, good[2], good[3]]) + b"\n"
    file = api.upload(body).json()
    assert file["status"] == "error"
    assert "line 3:" in file["status_details"] and expected in file["status_details"], file["status_details"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"preferred_output": [{"role": "user", "content": "x"}]}, "preferred_output"),
        ({"non_preferred_output": None}, "non_preferred_output"),
        ({"input": {"messages": "hi"}}, "input"),
    ],
)
def test_a_bad_preference_line_is_refused_with_its_line_number(api, change, expected):
    lines = [preference_line(i) for i in range(4)]
    lines[1] = {key: value for key, value in {**lines[1], **change}.items() if value is not None}
    file = api.upload(jsonl(lines)).json()
    assert file["status"] == "error"
    assert "line 2:" in file["status_details"] and expected in file["status_details"], file["status_details"]
    assert "line 1:" not in file["status_details"] and "line 3:" not in file["status_details"]


def test_mixed_formats_are_an_error_naming_the_line(api):
    body = jsonl([chat_line(0), chat_line(1), {"prompt": "p", "completion": "c"}])
    details = api.upload(body).json()["status_details"]
    assert "line 3:" in details and "mixes no formats" in details


def test_empty_file_is_an_error(api):
    file = api.upload(b"").json()
    assert file["status"] == "error" and "no examples" in file["status_details"]


def test_reported_errors_are_capped(api):
    body = b"".join(b"{oops\n" for _ in range(50))
    details = api.upload(body).json()["status_details"]
    assert details.startswith("50 problem(s)")
    assert "line 20:" in details and "line 21:" not in details
    assert "and 30 more" in details


def test_unsupported_purpose_is_rejected_and_nothing_stored(api):
    response = api.upload(chat_file(), purpose="assistants")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "purpose"
    assert api.store_files() == []


def _file_rows(api) -> int:
    with api.session() as session:
        return session.scalar(select(func.count()).select_from(File))


def test_upload_over_the_limit_is_413_and_leaves_nothing_behind(make_api):
    api = make_api(max_upload_bytes=10_000)
    body = chat_file(400)  # ~28 KB, streamed in 4 KB chunks
    assert len(body) > 10_000
    response = api.upload(body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"
    assert response.json()["error"]["param"] == "file"
    assert api.store_files() == []
    assert _file_rows(api) == 0


def test_declared_length_over_the_limit_is_refused_before_reading(make_api):
    api = make_api(max_upload_bytes=1000)
    response = api.client.post(
        "/v1/files", content=b"x" * 10, headers={"Content-Length": str(10**9), "Content-Type": "multipart/form-data; boundary=x"}
    )
    assert response.status_code == 413
    assert set(response.json()) == {"error"}


def test_a_failed_commit_removes_the_stored_content(api, monkeypatch):
    from sqlalchemy.orm import Session

    def broken_commit(self):  # noqa: ANN001
        raise RuntimeError("database went away")

    monkeypatch.setattr(Session, "commit", broken_commit)
    response = api.upload(chat_file())
    assert response.status_code == 500
    assert "database went away" not in response.text  # no internals leak
    assert api.store_files() == []


def test_list_paginates_with_has_more_and_after(any_db_api):
    api = any_db_api
    ids = [api.upload_ok() for _ in range(5)]
    first = api.client.get("/v1/files", params={"limit": 2}, headers=api.headers()).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [f["id"] for f in first["data"]] == ids[::-1][:2]  # newest first
    assert (first["first_id"], first["last_id"]) == (ids[4], ids[3])
    seen = [f["id"] for f in first["data"]]
    after = first["last_id"]
    while True:
        page = api.client.get("/v1/files", params={"limit": 2, "after": after}, headers=api.headers()).json()
        seen += [f["id"] for f in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids[::-1]
    ascending = api.client.get("/v1/files", params={"order": "asc"}, headers=api.headers()).json()
    assert [f["id"] for f in ascending["data"]] == ids and ascending["has_more"] is False


def test_list_filters_by_purpose_and_rejects_unknown_cursor(api):
    api.upload_ok()
    assert api.client.get("/v1/files", params={"purpose": "fine-tune-results"}, headers=api.headers()).json()["data"] == []
    response = api.client.get("/v1/files", params={"after": "file-nope"}, headers=api.headers())
    assert response.status_code == 400 and response.json()["error"]["param"] == "after"


def test_retrieve_and_delete(any_db_api):
    api = any_db_api
    file_id = api.upload_ok()
    assert api.client.get(f"/v1/files/{file_id}", headers=api.headers()).json()["id"] == file_id
    stored = api.store_files()
    assert len(stored) == 1
    deleted = api.client.delete(f"/v1/files/{file_id}", headers=api.headers()).json()
    assert deleted == {"id": file_id, "object": "file", "deleted": True}
    assert api.store_files() == []
    assert api.client.get(f"/v1/files/{file_id}", headers=api.headers()).status_code == 404


def test_content_is_sent_with_a_safe_filename(api):
    body = chat_file()
    response = api.upload(body, filename='../../etc/"evil"\r\nX-Injected: 1.jsonl')
    file = response.json()
    assert "/" not in file["filename"] and "\n" not in file["filename"]
    content = api.client.get(f"/v1/files/{file['id']}/content", headers=api.headers())
    assert content.status_code == 200 and content.content == body
    disposition = content.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    assert "\r" not in disposition and "\n" not in disposition and "x-injected" not in content.headers


def test_a_file_used_by_an_unfinished_job_cannot_be_deleted(api):
    job = api.job_ok()
    response = api.client.delete(f"/v1/files/{job['training_file']}", headers=api.headers())
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_state"
