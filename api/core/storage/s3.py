"""The S3 store: objects in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2...) through boto3, with
`LocalStorage`'s directory as its working area and read cache.

A writer stages locally (`part_path`); `commit` uploads the staged file (multipart above 8 MiB, so memory
stays bounded whatever the size) and only then moves it into the cache. A reader asks for `path(key)` and
gets a local copy, downloaded into the cache on first use. A directory (a published adapter) is its files
under `<key>/` plus a listing, `<key>/.svfit-dir.json`, uploaded last: until the listing exists the
directory does not, so no reader ever fetches half of one. Keys are write-once, so a cached copy is never
stale; the cache may be emptied whenever the service is stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from api.core.errors import ServiceUnavailable
from api.core.settings import Settings
from api.core.storage.interface import StorageUnavailable
from api.core.storage.local import LocalStorage

try:
    import boto3
    from boto3.exceptions import Boto3Error
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
except ImportError as exc:  # pragma: no cover - the `s3` extra is not installed
    raise StorageUnavailable(
        "SVFIT_STORAGE=s3 needs boto3, which is not installed: pip install 'svfit-service[s3]'."
    ) from exc

log = logging.getLogger(__name__)

DIR_LISTING = ".svfit-dir.json"
DIR_LISTING_VERSION = 1
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
# Multipart above 8 MiB in 8 MiB parts, four at a time: at most a few parts in memory per transfer.
TRANSFER = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=4)


@lru_cache
def s3_client(endpoint_url: str | None, region: str | None) -> Any:
    """One boto3 client per endpoint (clients are thread-safe; building one costs tens of milliseconds).
    Credentials come from the standard AWS chain: environment, shared config/profile, instance role."""
    options: dict[str, Any] = {"retries": {"max_attempts": 5, "mode": "standard"}, "connect_timeout": 5}
    if endpoint_url:
        # Other S3-compatible servers: path-style addressing (no per-bucket DNS names), and checksums only
        # where S3 requires them (some servers reject the newer default CRC trailers).
        options.update(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=Config(**options))


def _reopened(root: Path, bucket: str, prefix: str, endpoint_url: str | None, region: str | None) -> S3Storage:
    """The store ``S3Storage.__reduce__`` describes, with a client of this process."""
    return S3Storage(root, s3_client(endpoint_url, region), bucket, prefix, endpoint_url=endpoint_url)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
    return str(exc)


class S3Storage(LocalStorage):
    """`LocalStorage`'s interface over a bucket; `root` is the local cache. Transfer failures surface as
    `ServiceUnavailable` (503), never as a half-written object."""

    def __init__(self, root: Path, client: Any, bucket: str, prefix: str = "", *, endpoint_url: str | None = None):
        super().__init__(root)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def __reduce__(self) -> tuple:
        # A multi-GPU job hands its basis store, over this store, to the processes of its other ranks
        # (svfit_core/training/distributed.py). A boto3 client does not pickle: each process builds its own.
        return _reopened, (self.root, self.bucket, self.prefix, self.endpoint_url, self.client.meta.region_name)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        assert settings.s3_bucket  # the settings refuse storage='s3' without a bucket
        client = s3_client(settings.s3_endpoint_url, settings.s3_region)
        return cls(
            settings.store_dir, client, settings.s3_bucket, settings.s3_prefix, endpoint_url=settings.s3_endpoint_url
        )

    def check(self) -> None:
        """One HeadBucket: a missing bucket, an unreachable endpoint or absent credentials stop start-up
        with a message naming the setting, instead of failing the first upload."""
        endpoint = self.endpoint_url or "AWS S3"
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError as exc:
            raise StorageUnavailable(
                "SVFIT_STORAGE=s3: no AWS credentials found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE, or run with an instance role)."
            ) from exc
        except EndpointConnectionError as exc:
            raise StorageUnavailable(
                f"SVFIT_S3_ENDPOINT_URL: cannot reach the object store at {endpoint} ({exc})."
            ) from exc
        except ClientError as exc:
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _NOT_FOUND or status == "404":
                message = f"SVFIT_S3_BUCKET: no bucket {self.bucket!r} at {endpoint}."
            elif status == "403":
                message = f"SVFIT_S3_BUCKET: these AWS credentials may not access bucket {self.bucket!r} at {endpoint}."
            else:
                message = f"SVFIT_S3_BUCKET: HeadBucket on {self.bucket!r} at {endpoint} failed ({_reason(exc)})."
            raise StorageUnavailable(message) from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(
                f"SVFIT_S3_ENDPOINT_URL / SVFIT_S3_REGION: the object store at {endpoint} cannot be used ({exc})."
            ) from exc

    # --- keys -------------------------------------------------------------------------------------------

    def object_key(self, key: str) -> str:
        """The bucket key of store key `key` (refused, like a local path, if it leads out of the store)."""
        relative = self._resolve(key).relative_to(self.root.resolve()).as_posix()
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _unavailable(self, verb: str, name: str, exc: BaseException) -> ServiceUnavailable:
        # The details (bucket, key, the server's words) go to the log; clients learn only what failed.
        log.warning("object store %s failed to %s %s: %s", self.location, verb, name, _reason(exc))
        return ServiceUnavailable(f"The file store failed to {verb} an object; try again shortly.")

    @contextmanager
    def _calling(self, verb: str, name: str) -> Iterator[None]:
        try:
            yield
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise self._unavailable(verb, name, exc) from exc

    def _unless_missing(self, verb: str, call: Any, **kwargs: Any) -> Any:
        """`call(Bucket=..., **kwargs)`, or None when the object it names is not in the bucket."""
        try:
            return call(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
                return None
            raise self._unavailable(verb, kwargs["Key"], exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(verb, kwargs["Key"], exc) from exc

    def _has_object(self, name: str) -> bool:
        return self._unless_missing("check", self.client.head_object, Key=name) is not None

    def _listing(self, name: str) -> dict[str, int] | None:
        """{relative path: size} of the directory published at bucket key `name`, or None if there is none."""

        def read(**kwargs: Any) -> bytes:
            return self.client.get_object(**kwargs)["Body"].read()

        body = self._unless_missing("read", read, Key=f"{name}/{DIR_LISTING}")
        if body is None:
            return None
        return {str(rel): int(size) for rel, size in json.loads(body)["files"].items()}

    # --- the interface ------------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """A local path holding `key`: the cached copy, fetched from the bucket first if missing (a file,
        or a directory's files). If the bucket has neither, the path does not exist, as with a local store."""
        target = self._resolve(key)
        if not target.exists():
            name = self.object_key(key)
            if self._has_object(name):
                self._fetch_file(name, target)
            elif (listing := self._listing(name)) is not None:
                self._fetch_dir(name, listing, target)
        return target

    def commit(self, key: str) -> Path:
        """Upload what was staged at `part_path(key)` (a file, or a directory with its listing last), then
        keep it as the cached copy. A failed upload leaves the staged copy for the writer to remove."""
        target = self._resolve(key)
        part = self.part_path(key)
        name = self.object_key(key)
        if part.is_dir():
            self._upload_dir(part, name)
        else:
            self._upload_file(part, name)
        if target.is_dir():  # an older cached copy (a retried publish): replaced, not merged
            shutil.rmtree(target)
        os.replace(part, target)
        return target

    def exists(self, key: str) -> bool:
        if self._resolve(key).exists():
            return True
        name = self.object_key(key)
        return self._has_object(name) or self._has_object(f"{name}/{DIR_LISTING}")

    def delete(self, key: str) -> None:
        """Remove the object, or the directory (its listing first, so it stops existing before its files
        go), then the cached copy. Absent is fine."""
        name = self.object_key(key)
        try:
            with self._calling("delete", name):
                self.client.delete_object(Bucket=self.bucket, Key=name)
                self.client.delete_object(Bucket=self.bucket, Key=f"{name}/{DIR_LISTING}")
                pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{name}/")
                for page in pages:  # at most 1,000 keys a page, as delete_objects takes
                    objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                    if objects:
                        self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        finally:  # the local copies (and a writer's staged `.part`) go even when the bucket cannot be reached
            super().delete(key)

    # --- transfers ----------------------------------------------------------------------------------------

    def _upload_file(self, source: Path, name: str) -> None:
        with self._calling("store", name):
            self.client.upload_file(str(source), self.bucket, name, Config=TRANSFER)

    def _upload_dir(self, source: Path, name: str) -> None:
        files: dict[str, int] = {}
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = path.relative_to(source).as_posix()
            if relative == DIR_LISTING:
                raise ValueError(f"a stored directory may not hold a file named {DIR_LISTING}")
            self._upload_file(path, f"{name}/{relative}")
            files[relative] = path.stat().st_size
        body = json.dumps({"format_version": DIR_LISTING_VERSION, "files": files}, sort_keys=True).encode()
        with self._calling("store", f"{name}/{DIR_LISTING}"):
            self.client.put_object(
                Bucket=self.bucket, Key=f"{name}/{DIR_LISTING}", Body=body, ContentType="application/json"
            )

    def _fetching(self, target: Path) -> Path:
        """A private name beside `target` to download into; the finished copy is renamed onto `target`."""
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.with_name(f"{target.name}.fetch-{uuid.uuid4().hex[:12]}")

    def _fetch_file(self, name: str, target: Path) -> None:
        scratch = self._fetching(target)
        try:
            with self._calling("fetch", name):
                self.client.download_file(self.bucket, name, str(scratch), Config=TRANSFER)
            os.replace(scratch, target)
        finally:
            scratch.unlink(missing_ok=True)

    def _fetch_dir(self, name: str, listing: dict[str, int], target: Path) -> None:
        scratch = self._fetching(target)
        scratch.mkdir()
        try:
            for relative, size in listing.items():
                out = (scratch / relative).resolve()
                if scratch.resolve() not in out.parents:  # a listing is ours, but never trust a path in data
                    raise ValueError(f"the listing of {name} names a path outside it: {relative!r}")
                out.parent.mkdir(parents=True, exist_ok=True)
                with self._calling("fetch", f"{name}/{relative}"):
                    self.client.download_file(self.bucket, f"{name}/{relative}", str(out), Config=TRANSFER)
                if out.stat().st_size != size:
                    log.warning("object store %s: %s/%s has %d bytes, its listing says %d",
                                self.location, name, relative, out.stat().st_size, size)
                    raise ServiceUnavailable("The file store returned an incomplete object; try again shortly.")
            try:
                os.replace(scratch, target)
            except OSError:
                if not target.is_dir():  # not merely another reader that cached the same directory first
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
