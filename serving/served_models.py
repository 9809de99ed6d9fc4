"""What a replica answers for: the base models in its models folder, and the fine-tunes the router loaded
into it by name (`/v1/load_lora_adapter`, as vLLM's dynamic adapters). A loaded name maps to the adapter
folder in the shared store; the weights themselves load on the first request that needs them.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from pathlib import Path

from api.core.base_checkpoints import list_base_models
from api.core.errors import InvalidParameter, UnknownModel
from api.core.settings import Settings
from api.core.storage import Storage
from serving.types import ModelRef
from svfit_core.training.layout import TRAINING_META

# A base model copied into the models folder is served within this many seconds.
BASES_RELIST_S = 5.0


def _unknown(model_id: str) -> UnknownModel:
    return UnknownModel(f"The model '{model_id}' does not exist or you do not have access to it.", param="model")


class ServedModels:
    """Bases by id and loaded adapters by name; the least recently used adapter beyond `max_adapters` is
    unloaded, as vLLM does beyond `--max-loras`. Thread-safe: the heartbeat reads it from its own thread."""

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.max_adapters = settings.inference_max_adapters
        self._adapters: OrderedDict[str, ModelRef] = OrderedDict()
        self._lock = threading.Lock()
        self._bases: tuple[float, dict[str, Path]] = (0.0, {})

    def bases(self) -> dict[str, Path]:
        """The models folder's bases, listed again at most every few seconds (a listing reads the disk)."""
        listed_at, bases = self._bases
        if time.monotonic() - listed_at > BASES_RELIST_S:
            bases = {base.id: Path(base.path) for base in list_base_models(self.settings.models_dir)}
            self._bases = (time.monotonic(), bases)
        return bases

    def adapters(self) -> dict[str, ModelRef]:
        with self._lock:
            return dict(self._adapters)

    def load(self, name: str, lora_path: str, base_id: str | None) -> ModelRef:
        """Register an adapter under `name` (again: refreshed, not an error). `lora_path` is a key in the store
        (a published fine-tune: SVFit, LoRA or full, as training wrote it) or, as vLLM takes it, the absolute
        path of a PEFT LoRA folder (what the router hands external engines)."""
        bases = self.bases()
        if not base_id or base_id not in bases:
            raise InvalidParameter(f"This replica does not serve the base model '{base_id}'.", param="base_model_name")
        adapter_dir = Path(lora_path) if Path(lora_path).is_absolute() else self.storage.path(lora_path)
        meta_path, config_path = adapter_dir / TRAINING_META, adapter_dir / "adapter_config.json"
        if not meta_path.is_file() and not config_path.is_file():
            raise _unknown(name)  # the row outlived its weights: nothing to serve
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"task": "causal"}
        if config_path.is_file() and json.loads(config_path.read_text()).get("peft_type") == "LORA":
            # A PEFT LoRA folder (an export keeps the training's meta, whose method was SVFit): serve it as LoRA.
            meta["method"] = "lora"
        labels = meta.get("label_names")
        ref = ModelRef(
            model_id=name, base_id=base_id, base_path=bases[base_id], task=meta.get("task", "causal"),
            adapter_dir=adapter_dir, method=meta.get("method"), label_names=tuple(labels) if labels else None,
            text_pair=meta.get("text_pair"),  # absent before training recorded it: either input kind
        )
        with self._lock:
            self._adapters[name] = ref
            self._adapters.move_to_end(name)
            while len(self._adapters) > self.max_adapters:
                self._adapters.popitem(last=False)
        return ref

    def unload(self, name: str) -> bool:
        with self._lock:
            return self._adapters.pop(name, None) is not None

    def resolve(self, model_id: str) -> ModelRef:
        """The base or loaded adapter `model_id` names; 404 (param `model`) otherwise."""
        with self._lock:
            ref = self._adapters.get(model_id)
            if ref is not None:
                self._adapters.move_to_end(model_id)
                return ref
        bases = self.bases()
        if model_id in bases:
            return ModelRef(model_id=model_id, base_id=model_id, base_path=bases[model_id])
        raise _unknown(model_id)
