"""Fault injection: named points in the worker where a test can stop the process dead, so it can SIGKILL it
at exactly that moment (the fault suite in tests/faults uses it; see docs/FAULT_TOLERANCE.md).

Inert unless `SVFIT_FAULT_INJECT` is set: then `point(name)` costs one dictionary lookup for a point that
is not listed. The variable lists `point:action` pairs, comma-separated:

    SVFIT_FAULT_INJECT=checkpoint_write:sleep,artifact_publish:sleep

Actions: `sleep` blocks the calling thread for good (the heartbeat keeps beating, as it would in a worker
stalled on a slow disk, until the test kills the process); `enospc` raises OSError(ENOSPC), as a full disk
would. With `SVFIT_FAULT_DIR` also set, a listed point is armed only while the file `<dir>/<point>` exists
and fires once across every process sharing the dir: the first to reach it renames the file to
`<point>.fired` and writes its pid there, so a test can arm a fault at runtime in a running worker pool,
know which process hit it and kill exactly that one.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

ENV_POINTS = "SVFIT_FAULT_INJECT"
ENV_DIR = "SVFIT_FAULT_DIR"
ACTIONS = frozenset({"sleep", "enospc"})

# The points the worker calls, where they are, and why a crash there matters.
POINTS = {
    # A checkpoint is half-copied into the store (`<key>.part`), not yet renamed into place or recorded.
    "checkpoint_write": "worker.publishing.publish_dir (a checkpoint)",
    # The final adapter is half-copied into the store (`<key>.part`); the job is not yet marked succeeded.
    "artifact_publish": "worker.publishing.publish_dir (the final adapter)",
}


@lru_cache(maxsize=1)
def _configured(spec: str) -> dict[str, str]:
    points: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition(":")
        if name not in POINTS or action not in ACTIONS:
            raise ValueError(f"{ENV_POINTS}: unknown fault {item!r}; points {sorted(POINTS)}, actions {sorted(ACTIONS)}")
        points[name] = action
    return points


def _claim(name: str) -> bool:
    """Whether this process fires `name` now: always without a fault dir, else only if it wins the armed file."""
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return True
    armed, fired = Path(folder) / name, Path(folder) / f"{name}.fired"
    try:
        # The rename is atomic: of several workers reaching the point at once, exactly one wins.
        os.rename(armed, fired)
    except FileNotFoundError:
        return False
    fired.write_text(str(os.getpid()))
    return True


def point(name: str) -> None:
    """Fault point `name`: does nothing unless SVFIT_FAULT_INJECT lists it (and, with a fault dir, it is armed)."""
    spec = os.environ.get(ENV_POINTS)
    if not spec:
        return
    action = _configured(spec).get(name)
    if action is None or not _claim(name):
        return
    log.warning("fault injection: %s reached in pid %s; action %s", name, os.getpid(), action)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    while True:  # "sleep": until the test kills the process
        time.sleep(3600)
