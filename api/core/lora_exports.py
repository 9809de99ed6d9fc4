"""The LoRA folders external engines (vLLM, SGLang) load: a fine-tune exported as PEFT LoRA at the serving
rank r' (the r' largest |Δσ| of each layer; ≤ the engine's --max-lora-rank), built once and kept in the store.

The folder's path is what the engine is told to load, so the engine's host must see the store at the same
path (a shared volume). Building it loads the base model's bases here: only external engines need it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from api.core.base_checkpoints import resolve_base_model
from api.core.basis_store import StoredBases
from api.core.settings import Settings
from api.core.storage import Storage
from api.core.route_targets import RouteTarget


def lora_export_dir(storage: Storage, settings: Settings, target: RouteTarget, rank: int) -> Path:
    key = f"serving-exports/{target.adapter_key}/peft_lora-r{rank}"
    if storage.exists(key):
        return storage.path(key)
    from svfit_core.training.outputs import write_artifact  # torch: only when an external engine needs it

    part = storage.part_path(key)
    shutil.rmtree(part, ignore_errors=True)
    write_artifact(resolve_base_model(target.base_id, settings.models_dir), storage.path(target.adapter_key),
                   "peft_lora", part, rank=rank, bases=StoredBases(storage))
    return storage.commit(key)
