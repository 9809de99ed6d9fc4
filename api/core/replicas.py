"""The registry of serving replicas: each replica's heartbeat writes its row, the API's router reads the live
ones. Plain functions over a session; a row is live while its last beat is younger than the TTL.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from api.core.tables import ServingReplica

ENGINES = ("native", "vllm", "sglang")


@dataclass(frozen=True)
class ReplicaState:
    """What a heartbeat says about a replica. `url` is its base URL (the API calls `{url}/v1/...`)."""

    id: str
    url: str
    engine: str = "native"
    device: str = "cpu"
    servable_bases: tuple[str, ...] = ()
    loaded_bases: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()
    max_adapters: int = 256
    max_lora_rank: int | None = None
    free_memory_bytes: int | None = None
    in_flight: int = 0
    started_at: float = field(default_factory=time.time)
    beat_at: float = 0.0  # as read from the registry; `beat` stamps its own


def _columns(state: ReplicaState) -> dict:
    values = asdict(state)
    del values["beat_at"]
    for name in ("servable_bases", "loaded_bases", "adapters"):
        values[name] = list(values[name])
    return values


def beat(session: Session, state: ReplicaState, ttl_s: float) -> None:
    """Write `state` as the replica's row, stamped now, and delete rows that stopped beating."""
    now = time.time()
    row = session.scalar(select(ServingReplica).where(ServingReplica.id == state.id))
    if row is None:
        session.add(ServingReplica(**_columns(state), beat_at=now))
    else:
        for name, value in _columns(state).items():
            setattr(row, name, value)
        row.beat_at = now
    session.execute(delete(ServingReplica).where(ServingReplica.beat_at < now - ttl_s, ServingReplica.id != state.id))
    session.commit()


def live_replicas(session: Session, ttl_s: float) -> list[ReplicaState]:
    """Every replica that beat within the TTL, oldest registration first."""
    rows = session.scalars(
        select(ServingReplica).where(ServingReplica.beat_at >= time.time() - ttl_s).order_by(ServingReplica.pk)
    )
    return [
        ReplicaState(
            id=row.id, url=row.url, engine=row.engine, device=row.device,
            servable_bases=tuple(row.servable_bases), loaded_bases=tuple(row.loaded_bases),
            adapters=tuple(row.adapters), max_adapters=row.max_adapters, max_lora_rank=row.max_lora_rank,
            free_memory_bytes=row.free_memory_bytes, in_flight=row.in_flight, started_at=row.started_at,
            beat_at=row.beat_at,
        )
        for row in rows
    ]


def remove(session: Session, replica_id: str) -> None:
    """A replica leaving cleanly takes its row with it, so no request waits out the TTL on it."""
    session.execute(delete(ServingReplica).where(ServingReplica.id == replica_id))
    session.commit()
