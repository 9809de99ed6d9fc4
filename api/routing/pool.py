"""The router's view of the serving replicas: the registry's live rows (read again at most once a second),
what this API process has sent each one (requests in flight, adapters it loaded, bases it made it load), and
replicas that just failed a connection (left out until they beat again).

Choice: among the replicas that can serve the base, one that already holds the model (the adapter loaded, or
the base in memory) first, unless every such one has a full batch in flight; then the least loaded.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from api.core.errors import NoServingReplica, UnknownModel
from api.core.replicas import ReplicaState, live_replicas
from api.core.settings import Settings
from api.core.route_targets import RouteTarget

REFRESH_S = 1.0


@dataclass
class ReplicaView:
    """One replica: its last heartbeat and what this process knows beyond it."""

    state: ReplicaState
    in_flight: int = 0
    adapters: OrderedDict[str, None] = field(default_factory=OrderedDict)  # loaded by us; least recent first
    bases: set[str] = field(default_factory=set)  # bases it holds, from its beats and our own requests
    failed_beat_at: float | None = None  # set when a connection failed; cleared by a newer beat

    def holds(self, target: RouteTarget) -> bool:
        if target.adapter_key is not None:
            return target.model_id in self.adapters
        return target.base_id in self.bases


class ReplicaPool:
    def __init__(self, settings: Settings, sessions: sessionmaker) -> None:
        self.settings = settings
        self.sessions = sessions
        self.views: dict[str, ReplicaView] = {}
        self._read_at = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._read_at < REFRESH_S:
            return
        async with self._lock:
            if not force and time.monotonic() - self._read_at < REFRESH_S:
                return
            states = await run_in_threadpool(self._read)
            self._read_at = time.monotonic()
            views = {}
            for state in states:
                view = self.views.get(state.id) or ReplicaView(state)
                view.state = state
                if view.failed_beat_at is not None and state.beat_at > view.failed_beat_at:
                    view.failed_beat_at = None  # it beat after the failure: alive after all
                view.bases.update(state.loaded_bases)
                known = set(state.adapters)
                for name in list(view.adapters):
                    if name not in known and view.state.engine == "native":
                        del view.adapters[name]  # the replica let it go (its own limit, or a restart)
                for name in state.adapters:
                    view.adapters.setdefault(name, None)
                views[state.id] = view
            self.views = views

    def _read(self) -> list[ReplicaState]:
        with self.sessions() as session:
            return live_replicas(session, self.settings.serving_replica_ttl_s)

    def choose(self, target: RouteTarget, exclude: set[str]) -> ReplicaView:
        """The replica for `target`, never one in `exclude` (already tried for this request)."""
        if not self.views:
            raise NoServingReplica("No serving replica is running; start one with `svfit serving`.")
        servers = [v for v in self.views.values() if target.base_id in v.state.servable_bases]
        if not servers:
            if target.adapter_key is None:
                raise UnknownModel(
                    f"The model '{target.model_id}' does not exist or you do not have access to it.", param="model"
                )
            raise NoServingReplica(f"No running serving replica serves the base model '{target.base_id}'.")
        candidates = [v for v in servers if v.state.id not in exclude and v.failed_beat_at is None]
        if not candidates:
            raise NoServingReplica("Every serving replica that could take this request failed; retry shortly.")
        full = self.settings.inference_max_batch
        holders = [v for v in candidates if v.holds(target) and v.in_flight < full]
        pool = holders or candidates
        random.shuffle(pool)  # ties go anywhere, not always to the oldest replica
        return min(pool, key=lambda v: (v.in_flight, v.state.in_flight))

    def failed(self, view: ReplicaView) -> None:
        """A connection to it failed: no more requests until the registry is read again and it still beats."""
        view.failed_beat_at = time.time()
        self._read_at = 0.0  # read the registry on the next request

    def used_adapter(self, view: ReplicaView, name: str) -> list[str]:
        """Note `name` as loaded and most recent; the names beyond the replica's limit, to unload."""
        view.adapters[name] = None
        view.adapters.move_to_end(name)
        excess = len(view.adapters) - view.state.max_adapters
        return [view.adapters.popitem(last=False)[0] for _ in range(max(0, excess))]

    def forget_adapter(self, view: ReplicaView, name: str) -> None:
        view.adapters.pop(name, None)
