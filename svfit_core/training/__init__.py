"""Training with SVFit or a baseline: the loop (``loop.py``), what a run is asked to do (``run_config.py``),
the data formats and their encoding, batching, the learning-rate schedule, resumable checkpoints,
data-parallel runs over several processes (``distributed.py``), the methods (SVFit and the LoRA / PiSSA /
full / head-only baselines) and what a run leaves behind (``outputs.py``).

Like the package above it, importing this costs nothing until a name is touched: ``run_config.py`` and
``data.py`` are torch-free, so the service validates requests and uploads with them without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from svfit_core.lazy_exports import lazy_getattr

_EXPORTS = {
    **dict.fromkeys(("HyperparameterError", "PeftSpec", "TrainConfig"), ".run_config"),
    **dict.fromkeys(("TrainingCallbacks", "TrainResult", "run_training"), ".loop"),
    "TRAINING_META": ".layout",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .run_config import HyperparameterError, PeftSpec, TrainConfig
    from .loop import TrainingCallbacks, TrainResult, run_training
    from .layout import TRAINING_META


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
