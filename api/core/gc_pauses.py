"""Keeps the garbage collector's full passes short, so that they do not show up in request latency.

A full collection walks every object the collector tracks, and nearly all of them live as long as the
process: modules, classes, functions. With the API's imports that is ~110k objects and an ~80 ms pass;
once the training library (torch, transformers) is imported to validate an upload or to serve a model,
~290k objects and ~180 ms, enough to stall every request in flight past a p99 of 25 ms. So after start-up
and after each such import, whatever is alive is frozen out of the collector's view (`gc.freeze`), and a
full pass walks only what was allocated since. Freezing happens before models are loaded, never after:
frozen objects are never collected, and an unloaded model must be.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_frozen_after: set[str] = set()


def freeze_long_lived(milestone: str) -> None:
    """Collect, then freeze everything alive, once per `milestone` ("start-up", "training library", …)."""
    with _lock:
        if milestone in _frozen_after:
            return
        gc.collect()  # the garbage of start-up goes first, so that none of it is frozen with the rest
        gc.freeze()
        _frozen_after.add(milestone)
