"""The file and artifact store, chosen by `SVFIT_STORAGE`: a local directory under the data dir (default,
`local.py`) or an S3-compatible bucket with a local cache (`s3.py`).

Both keep one interface (`interface.py`'s `Storage`): `path`, `part_path`, `commit`, `open`, `exists`, `delete`. Keys
are written once and never rewritten, which is what lets the S3 backend serve reads from its cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from api.core.settings import Settings, get_settings
from api.core.storage.interface import Storage, StorageUnavailable
from api.core.storage.local import LocalStorage

if TYPE_CHECKING:
    from api.core.storage.s3 import S3Storage

__all__ = ["LocalStorage", "S3Storage", "Storage", "StorageUnavailable", "get_storage", "storage_for"]


def storage_for(settings: Settings, *, check: bool = True) -> Storage:
    """The store `settings` describe. With `check`, an S3 bucket is probed once (HeadBucket) so that a
    misconfiguration stops start-up instead of failing requests later."""
    settings.store_dir.mkdir(parents=True, exist_ok=True)
    if settings.storage == "local":
        return LocalStorage(settings.store_dir)
    from api.core.storage.s3 import S3Storage  # boto3 is an optional extra: imported only when chosen

    storage = S3Storage.from_settings(settings)
    if check:
        storage.check()
    return storage


def get_storage() -> Storage:
    """The store of this process's settings. Unchecked: the processes check it once when they start."""
    return storage_for(get_settings(), check=False)


def __getattr__(name: str) -> type:
    if name == "S3Storage":
        from api.core.storage.s3 import S3Storage

        return S3Storage
    raise AttributeError(name)
