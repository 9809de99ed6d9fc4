"""The loaded lanes, keyed by what makes a model copy distinct, within a memory budget.

Keys are ``(kind, weights, dtype, device)``: every base is loaded once per dtype and device however many
adapters use it. When the lanes' bytes exceed the budget, the least recently used lanes that no row is
using are dropped; a lane in use is never dropped (the budget is then exceeded until it is idle).
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict

from serving.lanes import Lane

logger = logging.getLogger(__name__)


class ModelCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.lanes: OrderedDict[tuple, Lane] = OrderedDict()  # least recently used first

    def lookup(self, key: tuple) -> Lane | None:
        """The loaded lane for ``key`` (now the most recently used), or None."""
        lane = self.lanes.get(key)
        if lane is not None:
            self.lanes.move_to_end(key)
        return lane

    def add(self, key: tuple, lane: Lane) -> None:
        """Keep a freshly loaded lane, dropping idle ones to make room."""
        self.lanes[key] = lane
        self.evict(keep=key)

    @property
    def total_bytes(self) -> int:
        return sum(lane.nbytes for lane in self.lanes.values())

    def evict(self, keep: tuple | None = None) -> None:
        """Drop idle lanes, least recently used first, until the total fits the budget."""
        dropped = False
        for key in list(self.lanes):
            if self.total_bytes <= self.budget_bytes:
                break
            lane = self.lanes[key]
            if key == keep or lane.busy:
                continue
            logger.info("unloading %s (%.0f MB) to stay within the inference memory budget", key, lane.nbytes / 2**20)
            del self.lanes[key]
            dropped = True
        if dropped:
            gc.collect()  # the dropped model's tensors go now, not at some later collection
