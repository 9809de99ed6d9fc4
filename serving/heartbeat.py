"""A replica's heartbeat: its row in the registry (api/core/replicas.py), rewritten every
`serving_heartbeat_s` on a thread of its own, and removed when the replica stops. The same loop beats for an
external engine (`svfit serving register`), whose description comes from watching that server.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.orm import sessionmaker

from api.core.db import make_engine
from api.core.migrations import ensure_up_to_date
from api.core.replicas import ReplicaState, beat, remove
from api.core.settings import Settings

logger = logging.getLogger(__name__)


class Heartbeat:
    """Beats `describe()` into the registry; a description of None (the watched server is down) skips a beat,
    so the row ages out and the router stops sending requests there."""

    def __init__(self, settings: Settings, describe: Callable[[], ReplicaState | None]) -> None:
        self.settings = settings
        self.describe = describe
        self.db = make_engine(settings.database_url)
        ensure_up_to_date(self.db, auto_migrate=False)
        self.sessions = sessionmaker(bind=self.db, expire_on_commit=False)
        self.replica_id: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat_once(self) -> bool:
        state = self.describe()
        if state is None:
            return False
        self.replica_id = state.id
        with self.sessions() as session:
            beat(session, state, self.settings.serving_replica_ttl_s)
        return True

    def start(self) -> None:
        """The first beat runs here, so a replica is routable (or its database error raised) once this returns."""
        self.beat_once()
        self._thread = threading.Thread(target=self._run, name="serving-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.serving_heartbeat_s):
            try:
                self.beat_once()
            except Exception:  # noqa: BLE001 - a database blip: the next beat tries again, the TTL covers the gap
                logger.warning("serving heartbeat failed; retrying in %.1fs", self.settings.serving_heartbeat_s,
                               exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if self.replica_id is not None:
                with self.sessions() as session:
                    remove(session, self.replica_id)
        except Exception:  # noqa: BLE001 - the row then ages out after the TTL
            logger.warning("could not remove this replica's registry row", exc_info=True)
        self.db.dispose()
