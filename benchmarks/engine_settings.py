"""The inference engine's settings on a machine without the API's packages (a GPU host with torch alone).

serving/ imports ``api.core.settings`` (engine, scheduler, lane manager, admission; and through
``api.core.storage`` the basis store), whose ``Settings`` is a pydantic-settings model; a host built for torch
work has no pydantic. The engine only reads attributes of its settings, so where pydantic-settings is not
installed ``use_engine_settings()`` registers a stand-in module ``api.core.settings`` whose ``Settings`` is a
plain dataclass of the fields the engine reads, with the defaults of api/core/settings.py
(tests/gpu/test_serving_gpu.py checks that they agree wherever both import). Where pydantic-settings is
installed nothing is replaced and the real ``Settings`` is used.

Call ``use_engine_settings()`` before anything imports ``serving``. Used by benchmarks/inference.py and
tests/gpu; never by the service.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

MODULE = "api.core.settings"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"


def pydantic_settings_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("pydantic", "pydantic_settings"))


@dataclass
class EngineSettings:
    """The fields of api/core/settings.py's ``Settings`` that the inference engine reads, same defaults."""

    data_dir: Path = Path("./data")
    models_dir: Path | None = None
    storage: str = "local"
    inference_device: str = "auto"
    inference_dtype: str = "auto"
    inference_max_batch: int = 32
    inference_batch_window_ms: float = 5.0
    inference_memory_budget_mb: float = 8192
    inference_max_adapters: int = 256
    inference_serving_rank: int | None = None
    inference_max_n: int = 16
    inference_max_scoring_mb: float = 1024
    inference_threads: int | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        if self.models_dir is None:
            self.models_dir = self.data_dir / "models"
        if self.storage != "local":
            raise ValueError("the stand-in settings serve from a local store only")
        if not re.match(DEVICE_PATTERN, self.inference_device):
            raise ValueError(f"inference_device {self.inference_device!r} does not match {DEVICE_PATTERN}")
        if self.inference_dtype not in DTYPES:
            raise ValueError(f"inference_dtype must be one of {DTYPES}, got {self.inference_dtype!r}")

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    def __getattr__(self, name: str):  # only called for names the dataclass lacks
        raise AttributeError(f"the stand-in engine settings (benchmarks/engine_settings.py) have no {name!r}: "
                             f"copy that field and its default from api/core/settings.py")


def standin_fields() -> dict[str, object]:
    """Field name -> default of the stand-in (for the check against the real settings)."""
    return {f.name: f.default for f in fields(EngineSettings)}


def use_engine_settings() -> bool:
    """Make ``api.core.settings`` importable for the engine; True when the stand-in was (or is) installed."""
    module = sys.modules.get(MODULE)
    if module is not None:
        return getattr(module, "STANDIN", False)
    if pydantic_settings_installed():
        return False
    import api.core  # the package itself imports nothing from pydantic

    module = types.ModuleType(MODULE, "Stand-in for api.core.settings (benchmarks/engine_settings.py).")
    module.Settings = EngineSettings
    module.get_settings = lru_cache(EngineSettings)
    module.STANDIN = True
    sys.modules[MODULE] = module
    api.core.settings = module
    return True


def engine_settings(data_dir: Path, **values):
    """Settings for an ``InferenceEngine``: the real ones where pydantic-settings is installed, else the
    stand-in (installed here if it was not yet)."""
    use_engine_settings()
    from api.core.settings import Settings

    return Settings(data_dir=Path(data_dir), **values)
