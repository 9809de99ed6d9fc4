"""The S3 store (SVFIT_STORAGE=s3) against a real S3-compatible HTTP server (moto's, on a loopback port):
the store's interface on its own, uploads and deletions through the HTTP API, and an adapter published by
the worker's code then downloaded as an artifact archive by an API with an empty cache."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import select, update

from api.core.settings import Settings
from api.core.storage import StorageUnavailable, storage_for
from api.core.storage.s3 import DIR_LISTING, S3Storage, s3_client
from api.core.tables import File, FineTunedModel, Job
from tests.api.conftest import BASE_MODEL, Api, chat_file
from tests.network import free_port
from worker import publishing

PREFIX = "svfit/test"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto's S3 server in a thread, with the throwaway credentials it accepts in the environment."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield f"http://127.0.0.1:{port}"
    server.stop()
    s3_client.cache_clear()


@pytest.fixture
def bucket(endpoint: str) -> str:
    name = f"svfit-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint, None).create_bucket(Bucket=name)
    return name


def _keys(endpoint: str, bucket: str) -> list[str]:
    listed = s3_client(endpoint, None).list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def _body(endpoint: str, bucket: str, key: str) -> bytes:
    return s3_client(endpoint, None).get_object(Bucket=bucket, Key=key)["Body"].read()


def _store(endpoint: str, bucket: str, cache: Path) -> S3Storage:
    cache.mkdir(parents=True, exist_ok=True)
    return S3Storage(cache, s3_client(endpoint, None), bucket, PREFIX, endpoint_url=endpoint)


# --- the store on its own ----------------------------------------------------------------------------------


def test_a_file_is_committed_to_the_bucket_read_through_a_fresh_cache_and_deleted(endpoint, bucket, tmp_path):
    writer = _store(endpoint, bucket, tmp_path / "writer")
    key = "files/org-1/file-abc.jsonl"
    body = b'{"text": "hi", "label": 0}\n' * 1000
    with writer.part_path(key).open("wb") as out:
        out.write(body)
    assert not writer.exists(key)  # staged is not stored
    cached = writer.commit(key)
    assert cached.read_bytes() == body and not writer.part_path(key).exists()
    assert _keys(endpoint, bucket) == [f"{PREFIX}/{key}"]
    assert _body(endpoint, bucket, f"{PREFIX}/{key}") == body

    reader = _store(endpoint, bucket, tmp_path / "reader")  # another process: nothing cached
    assert reader.exists(key) and not (tmp_path / "reader" / key).exists()
    with reader.open(key) as fh:
        assert fh.read() == body
    assert reader.path(key) == tmp_path / "reader" / key and reader.path(key).read_bytes() == body
    assert [p.name for p in reader.path(key).parent.iterdir()] == ["file-abc.jsonl"]  # no download leftovers

    writer.delete(key)
    assert _keys(endpoint, bucket) == []
    assert not writer.exists(key) and not writer.path(key).exists()
    reader.delete(key)  # deleting what is gone is fine, and drops the cached copy
    assert not (tmp_path / "reader" / key).exists()


def test_the_store_pickles_for_another_process_which_builds_its_own_client(endpoint, bucket, tmp_path):
    # What a multi-GPU job does to give its other ranks the basis store (svfit_core/training/distributed.py).
    store = _store(endpoint, bucket, tmp_path / "cache")
    with store.part_path("bases/k.safetensors").open("wb") as out:
        out.write(b"basis")
    store.commit("bases/k.safetensors")

    copy = pickle.loads(pickle.dumps(store))
    assert (copy.root, copy.bucket, copy.prefix, copy.endpoint_url) == (store.root, bucket, PREFIX, endpoint)
    copy.path("bases/k.safetensors").unlink()  # emptied cache: the copy downloads through its own client
    with copy.open("bases/k.safetensors") as fh:
        assert fh.read() == b"basis"


def test_a_missing_key_is_a_path_that_does_not_exist(endpoint, bucket, tmp_path):
    store = _store(endpoint, bucket, tmp_path / "cache")
    assert not store.exists("files/none.jsonl")
    assert not store.path("files/none.jsonl").exists()


def test_a_published_directory_is_uploaded_whole_and_fetched_into_a_fresh_cache(endpoint, bucket, tmp_path):
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_model.safetensors").write_bytes(b"w" * 50_000)
    (src / "adapter_config.json").write_text('{"r": 4}')
    (src / "sub" / "extra.bin").write_bytes(b"x")
    worker_store = _store(endpoint, bucket, tmp_path / "worker")
    key = publishing.final_key("ftjob-s3")
    stale = worker_store.part_path(key)  # a crashed attempt's leftover is discarded, not uploaded
    stale.mkdir()
    (stale / "junk").write_text("half")

    published = publishing.publish_dir(worker_store, src, key, {"job_id": "ftjob-s3"})
    assert not stale.exists()
    names = ["adapter_config.json", "adapter_model.safetensors", publishing.MANIFEST_NAME, "sub/extra.bin"]
    assert _keys(endpoint, bucket) == sorted(f"{PREFIX}/{key}/{n}" for n in [*names, DIR_LISTING])
    listing = json.loads(_body(endpoint, bucket, f"{PREFIX}/{key}/{DIR_LISTING}"))
    assert sorted(listing["files"]) == names

    api_store = _store(endpoint, bucket, tmp_path / "api")
    assert api_store.exists(key)
    fetched = api_store.path(key)
    assert sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()) == names
    for name in names:
        assert (fetched / name).read_bytes() == (published / name).read_bytes()
    assert [p.name for p in fetched.parent.iterdir()] == ["final"]  # no download leftovers
    manifest = json.loads((fetched / publishing.MANIFEST_NAME).read_text())
    assert manifest["files"]["adapter_model.safetensors"] == hashlib.sha256(b"w" * 50_000).hexdigest()

    # Published once: a retry with other content leaves the stored directory as it was.
    (src / "adapter_model.safetensors").write_bytes(b"other")
    retry_store = _store(endpoint, bucket, tmp_path / "retry")
    again = publishing.publish_dir(retry_store, src, key, {"job_id": "ftjob-s3"})
    assert (again / "adapter_model.safetensors").read_bytes() == b"w" * 50_000

    api_store.delete(key)
    assert _keys(endpoint, bucket) == []
    assert not _store(endpoint, bucket, tmp_path / "after").exists(key)


def test_a_directory_without_its_listing_does_not_exist(endpoint, bucket, tmp_path):
    """Files uploaded by a publish that died before its listing: readers see nothing."""
    client = s3_client(endpoint, None)
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/jobs/ftjob-half/final/adapter_model.safetensors", Body=b"w")
    store = _store(endpoint, bucket, tmp_path / "cache")
    assert not store.exists("jobs/ftjob-half/final")
    assert not store.path("jobs/ftjob-half/final").exists()


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "files/../../escape", "..", "."])
def test_keys_that_escape_the_store_are_refused(endpoint, bucket, tmp_path, key):
    store = _store(endpoint, bucket, tmp_path / "cache")
    for operation in (store.path, store.part_path, store.exists, store.delete, store.object_key):
        with pytest.raises(ValueError, match="escapes the store"):
            operation(key)
    assert _keys(endpoint, bucket) == []


# --- settings and start-up ---------------------------------------------------------------------------------


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", storage="s3", **values)


def test_storage_for_picks_the_backend_from_the_settings(endpoint, bucket, tmp_path):
    store = storage_for(_settings(tmp_path, s3_bucket=bucket, s3_endpoint_url=endpoint, s3_prefix="/a/b/"))
    assert isinstance(store, S3Storage) and store.location == f"s3://{bucket}/a/b"
    assert store.root == tmp_path / "data" / "s3-cache" and store.object_key("files/x") == "a/b/files/x"
    local = storage_for(Settings(data_dir=tmp_path / "local"))
    assert type(local).__name__ == "LocalStorage" and local.root == tmp_path / "local" / "store"
    with pytest.raises(ValueError, match="SVFIT_S3_BUCKET is required"):
        _settings(tmp_path)


def test_a_misconfigured_store_stops_start_up_naming_the_setting(endpoint, tmp_path, make_api):
    with pytest.raises(StorageUnavailable, match="SVFIT_S3_BUCKET: no bucket 'no-such-bucket'"):
        storage_for(_settings(tmp_path, s3_bucket="no-such-bucket", s3_endpoint_url=endpoint))
    with pytest.raises(StorageUnavailable, match="SVFIT_S3_ENDPOINT_URL: cannot reach"):
        storage_for(_settings(tmp_path, s3_bucket="b", s3_endpoint_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StorageUnavailable, match="SVFIT_S3_BUCKET"):
        make_api(storage="s3", s3_bucket="no-such-bucket", s3_endpoint_url=endpoint)


# --- through the service -----------------------------------------------------------------------------------


def _s3_api(make_api: Callable[..., Api], endpoint: str, bucket: str, **overrides: Any) -> Api:
    api = make_api(storage="s3", s3_bucket=bucket, s3_endpoint_url=endpoint, s3_prefix=PREFIX, **overrides)
    assert isinstance(api.app.state.storage, S3Storage)
    return api


def test_uploads_downloads_and_deletions_go_to_the_bucket(endpoint, bucket, make_api):
    api = _s3_api(make_api, endpoint, bucket)
    body = chat_file(5)
    file_id = api.upload_ok(body)
    with api.session() as session:
        key = session.scalars(select(File.storage_key).where(File.id == file_id)).one()
    assert _keys(endpoint, bucket) == [f"{PREFIX}/{key}"]
    assert _body(endpoint, bucket, f"{PREFIX}/{key}") == body

    # Served from the bucket, not from the copy the upload left in the cache.
    shutil.rmtree(api.settings.store_dir)
    response = api.client.get(f"/v1/files/{file_id}/content", headers=api.headers())
    assert response.status_code == 200 and response.content == body

    # Over the limit: refused, and nothing is left in the bucket or the cache.
    too_big = api.upload(b"x" * (api.settings.max_upload_bytes + 1))
    assert too_big.status_code == 413
    assert _keys(endpoint, bucket) == [f"{PREFIX}/{key}"]

    deleted = api.client.delete(f"/v1/files/{file_id}", headers=api.headers())
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert _keys(endpoint, bucket) == []
    assert not [p for p in api.settings.store_dir.rglob("*") if p.is_file()]
    assert api.client.get(f"/v1/files/{file_id}/content", headers=api.headers()).status_code == 404


def test_a_store_that_fails_mid_service_is_a_503_that_leaves_nothing_behind(endpoint, bucket, make_api):
    api = _s3_api(make_api, endpoint, bucket)
    s3_client(endpoint, None).delete_bucket(Bucket=bucket)
    response = api.upload(chat_file(5))
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "service_unavailable" and bucket not in error["message"]
    assert not [p for p in api.settings.store_dir.rglob("*") if p.is_file()]  # the staged upload is gone
    with api.session() as session:
        assert session.scalars(select(File)).all() == []


def _fake_svfit_adapter(root: Path) -> Path:
    """What the `svfit` format copies as written: the adapter files and the training meta."""
    from svfit_core.training import TRAINING_META

    root.mkdir()
    (root / "adapter_config.json").write_text('{"peft_type": "SVFIT", "r": 2}')
    (root / "adapter_model.safetensors").write_bytes(b"adapter weights " * 512)
    (root / TRAINING_META).write_text(json.dumps({"method": "svfit"}))
    return root


def test_an_adapter_published_by_the_worker_downloads_as_an_archive_from_an_empty_cache(
    endpoint, bucket, make_api, tmp_path
):
    api = _s3_api(make_api, endpoint, bucket)
    job_id = api.job_ok(peft={"type": "svfit"})["id"]
    org_id = api.org_ids["alpha"]
    key = publishing.final_key(job_id)
    adapter = _fake_svfit_adapter(tmp_path / "adapter")
    # The worker: another host, its own cache, the same bucket.
    publishing.publish_dir(_store(endpoint, bucket, tmp_path / "worker-cache"), adapter, key, {"job_id": job_id})
    model_id = f"ft:{BASE_MODEL}:{org_id}::{job_id[-12:]}"
    api.add(FineTunedModel(id=model_id, org_id=org_id, parent=BASE_MODEL, job_id=job_id, storage_key=key))
    with api.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="succeeded"))
        session.commit()
    assert not (api.settings.store_dir / key).exists()

    url = f"/v1/fine_tuning/jobs/{job_id}/artifacts"
    response = api.client.get(url, params={"format": "svfit"}, headers=api.headers())
    assert response.status_code == 200, response.text
    assert response.headers["x-content-sha256"] == hashlib.sha256(response.content).hexdigest()
    root = f"{job_id}-final-svfit"
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        assert f"{root}/adapter_config.json" in tar.getnames()
        weights = tar.extractfile(f"{root}/adapter_model.safetensors")
        assert weights is not None and weights.read() == (adapter / "adapter_model.safetensors").read_bytes()


def test_bases_computed_by_one_worker_are_read_by_another_through_the_bucket(endpoint, bucket, tmp_path):
    import torch

    from api.core.basis_store import StoredBases, basis_storage_key

    tensors = {"U": torch.randn(6, 2), "s": torch.tensor([3.0, 1.0]), "V": torch.randn(4, 2)}
    StoredBases(_store(endpoint, bucket, tmp_path / "worker-a")).save("k1", tensors)
    assert f"{PREFIX}/{basis_storage_key('k1')}" in _keys(endpoint, bucket)

    other = StoredBases(_store(endpoint, bucket, tmp_path / "worker-b"))  # another host: an empty cache
    loaded = other.load("k1")
    assert loaded is not None and all(torch.equal(loaded[name], tensors[name]) for name in tensors)
    assert other.load("missing") is None
