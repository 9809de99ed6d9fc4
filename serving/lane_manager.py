"""Which lane (loaded model copy) serves a ModelRef: the lane key that tells copies apart, loading a lane,
keeping it in the model cache, and the per-row tag of an adapter on its lane. The lane classes themselves
are in ``lanes.py``; the memory budget that drops idle lanes is ``model_cache.py``."""

from __future__ import annotations

import logging
from typing import Any

from svfit_core.errors import SVFitError
from svfit_core.multi_adapter import unshareable_reason
from svfit_core.serialization import read_adapter_config

from api.core.basis_store import StoredBases
from api.core.errors import InternalError, ModelNotGenerative, ServiceError, WrongModelTask
from api.core.settings import Settings
from serving.batching import LaneState
from serving.lanes import EncoderLane, Lane, LoraLane, ModelLane, SharedBaseLane
from serving.model_cache import ModelCache
from serving.pooling import max_sequence_length, pooling_mode
from serving.servable_models import (
    is_encoder,
    load_adapted_model,
    load_causal_base,
    load_encoder,
    load_full_model,
)
from serving.types import ModelRef

logger = logging.getLogger(__name__)

LORA_METHODS = ("lora", "pissa")  # PiSSA adapters are published as plain LoRA adapters


def not_generative(model_id: str, what: str) -> ModelNotGenerative:
    """The 400 for a chat or completion request to a model that generates no text (``what`` it is instead)."""
    return ModelNotGenerative(
        f"The model '{model_id}' is {what} and does not generate text, so /v1/chat/completions and "
        "/v1/completions cannot serve it. Use /v1/embeddings for its embeddings, or /v1/classifications with a "
        "classification fine-tune.", param="model")


class LaneManager:
    """Lane bookkeeping, mixed into ``scheduler.Scheduler``: every lane it hands out has a LaneState in
    ``states``, so admission and the decode loop find the lane's batch by its key."""

    # Set by Scheduler.__init__.
    settings: Settings
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    cache: ModelCache
    states: dict[tuple, LaneState]
    bases: StoredBases

    def _kind(self, ref: ModelRef) -> str:
        if ref.task == "classification":
            return "model"
        if ref.method is None:
            return "shared"
        if ref.method == "svfit":
            # An adapter that trains a whole module (a head), or a banded one, cannot share the base copy with
            # others: the library's loader serves it merged on a copy of its own.
            return "model" if unshareable_reason(read_adapter_config(ref.adapter_dir)) else "shared"
        if ref.method in LORA_METHODS:
            return "lora"
        return "model"

    def lane_key(self, ref: ModelRef, embedding: bool = False) -> tuple:
        """What makes the model copy serving ``ref`` (for embeddings, or else for its task) distinct:
        (kind, weights, dtype, device)."""
        kind = "encoder" if embedding else self._kind(ref)
        weights = str(ref.base_path if kind in ("shared", "lora") else ref.adapter_dir or ref.base_path)
        return (kind, weights, str(self.dtype), str(self.device))

    def loaded_lane(self, key: tuple) -> Lane | None:
        """The lane for ``key`` if it is in memory."""
        lane = self.cache.lookup(key)
        if lane is not None:
            self._track(key, lane)
        return lane

    def build_lane(self, ref: ModelRef, key: tuple) -> Lane:
        """Load the model copy for ``ref``, or raise the ServiceError a client should see. Reads only settings,
        so it may run on the loader thread while this thread decodes."""
        kind, weights = key[0], key[1]
        s = self.settings
        logger.info("loading %s model %s", kind, weights)
        try:
            if kind == "encoder":
                return self._encoder_lane(ref, key)
            if kind in ("shared", "lora") and is_encoder(ref.base_path):
                # transformers would load a BERT as a causal LM with a fresh head: a 200 of random word pieces.
                raise not_generative(ref.model_id, "an encoder")
            if kind == "shared":
                model, tokenizer, hashes = load_causal_base(ref.base_path, self.dtype, self.device)
                return SharedBaseLane(key, model, tokenizer, max_adapters=s.inference_max_adapters,
                                      serving_rank=s.inference_serving_rank, base_hashes=hashes, bases=self.bases)
            if kind == "lora":
                model, tokenizer, _ = load_causal_base(ref.base_path, self.dtype, self.device)
                return LoraLane(key, model, tokenizer, max_adapters=s.inference_max_adapters)
            if ref.task == "causal" and ref.method == "full":
                return ModelLane(key, *load_full_model(ref, self.dtype, self.device))
            if ref.adapter_dir is None:
                raise WrongModelTask(f"The model '{ref.model_id}' is not a classification model.", param="model")
            model, tokenizer = load_adapted_model(ref, self.dtype, self.device, self.bases)
            return ModelLane(key, model, tokenizer, task=ref.task)
        except ServiceError:
            raise
        except ValueError as exc:  # transformers' answer to "this folder is not that kind of model"
            logger.warning("cannot load %s as a %s model: %s", ref.model_id, ref.task, exc)
            what = "text generation" if ref.task == "causal" else "classification"
            raise WrongModelTask(f"The model '{ref.model_id}' cannot be served as a {what} model.",
                                 param="model") from exc
        except Exception as exc:
            logger.exception("loading %s failed", ref.model_id)
            raise InternalError(f"The model '{ref.model_id}' could not be loaded.", code="model_load_failed") from exc

    def _encoder_lane(self, ref: ModelRef, key: tuple) -> EncoderLane:
        generator = ref.task == "causal" if ref.adapter_dir is not None else not is_encoder(ref.base_path)
        if generator:
            raise WrongModelTask(
                f"The model '{ref.model_id}' generates text; embeddings come from encoder models and their "
                "classification fine-tunes.", param="model")
        model, tokenizer = load_encoder(ref, self.dtype, self.device, self.bases)
        return EncoderLane(key, model, tokenizer, pooling_mode(ref.base_path), max_sequence_length(ref.base_path))

    def install(self, key: tuple, lane: Lane) -> Lane:
        """Keep a lane ``build_lane`` loaded (idle lanes may be dropped to make room)."""
        self.cache.add(key, lane)
        self._track(key, lane)
        return lane

    def lane_for(self, ref: ModelRef, embedding: bool = False) -> Lane:
        """The lane serving ``ref``, loaded here and now if it is not in memory."""
        key = self.lane_key(ref, embedding)
        return self.loaded_lane(key) or self.install(key, self.build_lane(ref, key))

    def _track(self, key: tuple, lane: Lane) -> None:
        state = self.states.get(key)
        if state is None or state.lane is not lane:  # new, or reloaded after an eviction
            self.states[key] = LaneState(lane)

    def _tag(self, lane: Lane, ref: ModelRef) -> Any:
        try:
            return lane.tag_for(ref)
        except (SVFitError, OSError, ValueError) as exc:
            logger.exception("registering adapter %s failed", ref.adapter_dir)
            code = exc.code if isinstance(exc, SVFitError) else "model_load_failed"
            raise InternalError(f"The fine-tuned model '{ref.model_id}' could not be loaded: {exc}", code=code) from exc
