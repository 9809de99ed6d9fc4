"""SVFit (singular-value fine-tuning) for transformers models, in plain PyTorch.

The method sits at the top of the package: config, layer wrapper, injection, merge, native save/load and
exports. ``svfit_core.training`` holds the training loop, its config, data, schedule, checkpoints and the
baseline methods.

Importing the package costs nothing: each name below is imported from its module the first time it is
touched (PEP 562), so a torch-free module (``svfit_core.config``, ``svfit_core.errors``,
``svfit_core.training.run_config``) can be imported without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from svfit_core.lazy_exports import lazy_getattr

# public name -> the module (relative to this package) that defines it
_EXPORTS = {
    "SVFitConfig": ".config",
    **dict.fromkeys(
        ("AdapterFormatError", "BaseModelMismatchError", "ConfigError", "DataError", "DeviceMemoryError",
         "NonFiniteMergeError", "SVFitError", "TargetModulesNotFoundError", "UnsupportedLayerError"),
        ".errors",
    ),
    **dict.fromkeys(("export_merged", "export_peft_lora"), ".export"),
    "SVFitLayer": ".layer",
    **dict.fromkeys(("SVFitModel", "inject_svfit"), ".model"),
    **dict.fromkeys(("load_svfit_adapter", "save_svfit_adapter"), ".serialization"),
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .config import SVFitConfig
    from .errors import (
        AdapterFormatError,
        BaseModelMismatchError,
        ConfigError,
        DataError,
        DeviceMemoryError,
        NonFiniteMergeError,
        SVFitError,
        TargetModulesNotFoundError,
        UnsupportedLayerError,
    )
    from .export import export_merged, export_peft_lora
    from .layer import SVFitLayer
    from .model import SVFitModel, inject_svfit
    from .serialization import load_svfit_adapter, save_svfit_adapter


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
