"""The store's interface: what the API, the worker and the inference engine may ask of any backend.

Objects are files or directories under keys the service builds from generated ids. A writer fills
`part_path(key)` and calls `commit(key)`; keys are written once and never rewritten, which is what lets a
remote backend serve reads from a local cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO


class StorageUnavailable(RuntimeError):
    """The configured store cannot be used (no such bucket, unreachable endpoint, no credentials, boto3
    missing). Raised at start-up, with a message that names the setting to fix."""


class Storage(ABC):
    @abstractmethod
    def path(self, key: str) -> Path:
        """A local path holding `key`'s object (which may not exist: callers check)."""

    @abstractmethod
    def part_path(self, key: str) -> Path:
        """Where a writer streams a new object (a file, or a directory) before `commit` puts it in place."""

    @abstractmethod
    def commit(self, key: str) -> Path:
        """Make what was written at `part_path(key)` the object at `key`, in one step."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """`key`'s object (a file), opened for reading."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`'s object and anything a writer left half-written for it; absent is fine."""
