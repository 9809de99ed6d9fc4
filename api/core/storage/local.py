"""The local store: a directory under the data dir, one file (or one directory) per key.

Keys are built by the service from generated ids, never from user strings. Writes go to a `.part` file
(or directory) that is renamed into place, so a reader never sees half an object.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO

from api.core.storage.interface import Storage


class LocalStorage(Storage):
    """The store on a local directory. `S3Storage` extends it, with this directory as its cache."""

    def __init__(self, root: Path):
        self.root = root

    def _resolve(self, key: str) -> Path:
        """Where `key` lies under the root; a key (or a symlink) leading out of it is refused."""
        resolved = (self.root / key).resolve()
        if self.root.resolve() not in resolved.parents:
            raise ValueError(f"storage key escapes the store: {key!r}")
        return resolved

    def path(self, key: str) -> Path:
        """A local path holding `key`'s object (which may not exist: callers check)."""
        return self._resolve(key)

    def part_path(self, key: str) -> Path:
        """Where a writer streams a new object (a file, or a directory) before `commit` puts it in place."""
        target = self._resolve(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.with_name(target.name + ".part")

    def commit(self, key: str) -> Path:
        """Make what was written at `part_path(key)` the object at `key`, in one step."""
        target = self._resolve(key)
        os.replace(self.part_path(key), target)
        return target

    def open(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    def exists(self, key: str) -> bool:
        return self._resolve(key).exists()

    def delete(self, key: str) -> None:
        """Remove `key`'s object (file or directory) and any `.part` left by a writer; absent is fine."""
        target = self._resolve(key)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        part = target.with_name(target.name + ".part")
        if part.is_dir():
            shutil.rmtree(part, ignore_errors=True)
        else:
            part.unlink(missing_ok=True)
