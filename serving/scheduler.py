"""The engine thread's scheduler: one object that finds a request's lane (``lane_manager.py``), admits it
(``admission.py``) and runs the continuous-batching decode loop (``batching.py``). ``engine.py`` drives it."""

from __future__ import annotations

from api.core.basis_store import StoredBases
from api.core.settings import Settings
from api.core.storage import storage_for
from serving.admission import Admitter
from serving.batching import Batcher, LaneState
from serving.lane_manager import LaneManager
from serving.model_cache import ModelCache
from serving.servable_models import resolve_device, resolve_dtype


class Scheduler(LaneManager, Admitter, Batcher):
    """The three parts share this state (set up here, in one place) and call one another through ``self``,
    so a test may still patch any step (``Scheduler._decode``, ``Scheduler.build_lane``) on this class."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.inference_device)
        self.dtype = resolve_dtype(settings.inference_dtype, self.device)
        self.max_batch = settings.inference_max_batch
        self.cache = ModelCache(int(settings.inference_memory_budget_mb * 2**20))
        self.states: dict[tuple, LaneState] = {}
        # Compact SVFit adapters name their bases in the store; the trainer put them there.
        self.bases = StoredBases(storage_for(settings, check=False))
