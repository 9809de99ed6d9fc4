"""Model loading off the engine thread: a model that is not in memory yet loads on a thread of its own while
the engine goes on decoding for the lanes already loaded, and the requests that need it wait here.

Loading a base takes seconds to minutes (a GGUF is dequantised, safetensors are read, SVD bases are
checked); on the engine thread that would freeze every stream in flight for as long. One load runs at a
time: two models loading at once would only share the same cores and disk, and compete for the memory
budget before either is counted in it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoadFinished:
    """Put in the engine's inbox when a load ends: the lane (or the load's error) and who waited for it."""

    key: tuple
    outcome: Future
    waiting: list = field(default_factory=list)


class LaneLoader:
    """Engine-thread bookkeeping of loads in progress; only ``build`` runs on the loader thread."""

    def __init__(self, notify: Callable[[LoadFinished], None]) -> None:
        self._notify = notify  # hands a finished load back to the engine thread (its inbox)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="svfit-model-loader")
        self._waiting: dict[tuple, list] = {}  # lane key -> tickets, in arrival order

    def wait_for(self, key: tuple, ticket: Any, build: Callable[[], Any]) -> None:
        """Park ``ticket`` until the lane ``key`` is loaded, starting the load unless one is under way."""
        if key in self._waiting:
            self._waiting[key].append(ticket)
            return
        self._waiting[key] = [ticket]
        outcome = self._pool.submit(build)
        outcome.add_done_callback(lambda done: self._notify(LoadFinished(key, done)))

    def finish(self, finished: LoadFinished) -> LoadFinished:
        """The finished load with the tickets that waited for it (they are no longer parked)."""
        finished.waiting = self._waiting.pop(finished.key, [])
        return finished

    @property
    def loading(self) -> int:
        return len(self._waiting)

    def abandon(self) -> list:
        """Every parked ticket (the engine is stopping); a load under way finishes unheard."""
        tickets = [t for waiting in self._waiting.values() for t in waiting]
        self._waiting.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        return tickets
