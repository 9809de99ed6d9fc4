"""The file and artifact store: a local directory under the data dir.

Keys are built by the service from generated ids, never from user strings. Writes go to a `.part`
file that is renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO

from api.core.settings import Settings, get_settings


class LocalStorage:
    def __init__(self, root: Path):
        self.root = root

    def path(self, key: str) -> Path:
        resolved = (self.root / key).resolve()
        if self.root.resolve() not in resolved.parents:
            raise ValueError(f"storage key escapes the store: {key!r}")
        return resolved

    def part_path(self, key: str) -> Path:
        """Where a writer streams a new object before `commit` renames it into place."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.with_name(target.name + ".part")

    def commit(self, key: str) -> Path:
        target = self.path(key)
        os.replace(self.part_path(key), target)
        return target

    def open(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def delete(self, key: str) -> None:
        target = self.path(key)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        target.with_name(target.name + ".part").unlink(missing_ok=True)


def storage_for(settings: Settings) -> LocalStorage:
    root = settings.data_dir / "store"
    root.mkdir(parents=True, exist_ok=True)
    return LocalStorage(root)


def get_storage() -> LocalStorage:
    return storage_for(get_settings())
