"""Training with SVFit or a baseline: the loop (``loop.py``), what a run is asked to do (``config.py``),
the data formats and their encoding, batching, the learning-rate schedule, resumable checkpoints, the
methods (SVFit and the LoRA / PiSSA / full / head-only baselines) and what a run leaves behind
(``outputs.py``).

Like the package above it, importing this costs nothing until a name is touched: ``config.py`` and
``data.py`` are torch-free, so the service validates requests and uploads with them without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PeftSpec": ".config",
    "TrainConfig": ".config",
    "HyperparameterError": ".config",
    "TrainingCallbacks": ".loop",
    "TrainResult": ".loop",
    "run_training": ".loop",
    "TRAINING_META": ".layout",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .config import HyperparameterError, PeftSpec, TrainConfig
    from .loop import TrainingCallbacks, TrainResult, run_training
    from .layout import TRAINING_META


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'svfit_core.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
