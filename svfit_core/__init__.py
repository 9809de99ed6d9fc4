"""SVFit (singular-value fine-tuning) for transformers models, in plain PyTorch.

The method core: config, layer wrapper, injection, merge, native save/load and exports. Training, data
and baselines live in their own modules (``svfit_core.training``, ``svfit_core.data``) and are imported
from there, not from here, so importing the core stays cheap.
"""

from .config import SVFitConfig
from .errors import (
    AdapterFormatError,
    BaseModelMismatchError,
    ConfigError,
    DataError,
    NonFiniteMergeError,
    SVFitError,
    TargetModulesNotFoundError,
)
from .export import export_merged, export_peft_lora
from .layer import SVFitLayer
from .model import SVFitModel, inject_svfit
from .serialization import load_svfit_adapter

__all__ = [
    "AdapterFormatError",
    "BaseModelMismatchError",
    "ConfigError",
    "DataError",
    "NonFiniteMergeError",
    "SVFitConfig",
    "SVFitError",
    "SVFitLayer",
    "SVFitModel",
    "TargetModulesNotFoundError",
    "export_merged",
    "export_peft_lora",
    "inject_svfit",
    "load_svfit_adapter",
]
