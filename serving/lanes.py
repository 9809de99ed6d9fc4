"""Lanes: one loaded model copy each, and which requests can share a forward pass on it.

- ``SharedBaseLane``: one copy of a base model serving the base itself and every SVFit adapter of it in the
  same batch (``svfit_core.multi_adapter``: one forward, per-row Δσ).
- ``LoraLane``: a second copy of the base under HF PEFT, mixing LoRA (and converted PiSSA) adapters per row
  with PEFT's ``adapter_names`` batching.
- ``ModelLane``: a model of its own (a full fine-tune, a classifier, an SVFit adapter with a trained head
  or a banded coupling, merged).
- ``EncoderLane``: an encoder answering `/v1/embeddings`.

Rows carry a lane-specific ``tag`` (which adapter, None for the plain model). Adapters are registered on
first use and dropped least-recently-used beyond a per-lane limit, never while a row uses them.
"""

from __future__ import annotations

import hashlib
import inspect
from collections import Counter, OrderedDict
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from svfit_core.bases import BasisStore
from svfit_core.kv_cache import cache_argument
from svfit_core.multi_adapter import MultiAdapterModel
from svfit_core.sampling import eos_token_ids

from serving.servable_models import context_length, model_bytes
from serving.logprobs import TokenNames
from serving.types import ModelRef


class Lane:
    """A model copy plus what the scheduler needs to decode on it."""

    def __init__(self, key: tuple, model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: str = "causal") -> None:
        self.key = key
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.device = next(model.parameters()).device
        self.context_length = context_length(model, tokenizer)
        self.eos_ids = eos_token_ids(model, tokenizer) if task == "causal" else frozenset()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.nbytes = model_bytes(model)
        # Most causal LMs can skip the vocabulary projection for all but the last position.
        parameters = inspect.signature(model.forward).parameters
        self.keeps_last_logits = "logits_to_keep" in parameters
        self.cache_argument = cache_argument(model)
        self.in_use: Counter = Counter()  # tag -> rows holding it
        self.token_names = TokenNames(tokenizer)  # for log probabilities
        # Ids a request may name (prompt ids, logit_bias): known to the tokenizer and inside the model's table.
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        rows = getattr(embeddings, "num_embeddings", None)
        self.vocab_size = min(len(tokenizer), rows) if rows else len(tokenizer)
        self.logit_width = max(rows or 0, len(tokenizer))
        self._grammar_tokenizer: Any = ...  # not built yet; None once built: llguidance cannot read it

    def grammar_tokenizer(self):  # noqa: ANN201 - llguidance.LLTokenizer, imported only when a grammar is used
        """The tokenizer as grammars read it (serving/structured.py), or None: built on first use (a second)."""
        if self._grammar_tokenizer is ...:
            from serving.structured import grammar_tokenizer

            self._grammar_tokenizer = grammar_tokenizer(self.tokenizer, self.logit_width, self.eos_ids)
        return self._grammar_tokenizer

    def tag_for(self, ref: ModelRef) -> Any:
        """The row tag for ``ref`` on this lane, registering its adapter when needed."""
        return None

    def forward(self, tags: list, **inputs: Any) -> torch.Tensor:
        """Logits of the model for a batch whose row i uses ``tags[i]``."""
        return self.model(**inputs).logits

    def hold(self, tag: Any) -> None:
        self.in_use[tag] += 1

    def release(self, tag: Any) -> None:
        self.in_use[tag] -= 1
        if self.in_use[tag] <= 0:
            del self.in_use[tag]

    @property
    def busy(self) -> bool:
        return bool(self.in_use)


class _AdapterLane(Lane):
    """A lane whose rows pick among many registered adapters; keeps at most ``max_adapters`` of them."""

    def __init__(self, key, model, tokenizer, *, max_adapters: int) -> None:
        super().__init__(key, model, tokenizer)
        self.max_adapters = max_adapters
        self.registered: OrderedDict[str, ModelRef] = OrderedDict()  # tag -> ref, least recent first

    def _tag(self, ref: ModelRef) -> str:
        # PEFT keeps adapters in ModuleDicts, whose keys may not contain dots: hash the folder path.
        return "a" + hashlib.sha1(str(ref.adapter_dir).encode()).hexdigest()[:16]

    def tag_for(self, ref: ModelRef) -> str | None:
        if ref.adapter_dir is None:
            return None
        tag = self._tag(ref)
        if tag in self.registered:
            self.registered.move_to_end(tag)
            return tag
        self._make_room()
        self._register(tag, ref)
        self.registered[tag] = ref
        return tag

    def _make_room(self) -> None:
        for tag in list(self.registered):
            if len(self.registered) < self.max_adapters:
                return
            if tag not in self.in_use:
                self._unregister(tag)
                del self.registered[tag]

    def _register(self, tag: str, ref: ModelRef) -> None:
        raise NotImplementedError

    def _unregister(self, tag: str) -> None:
        raise NotImplementedError


class SharedBaseLane(_AdapterLane):
    """The base model and all its SVFit adapters in one copy; a batch mixes them freely."""

    def __init__(self, key, model, tokenizer, *, max_adapters: int, serving_rank: int | None,
                 base_hashes: dict[str, str] | None = None, bases: BasisStore | None = None) -> None:
        super().__init__(key, model, tokenizer, max_adapters=max_adapters)
        self.serving_rank = serving_rank
        self.multi = MultiAdapterModel(model, base_hashes=base_hashes, bases=bases)

    def _register(self, tag: str, ref: ModelRef) -> None:
        self.multi.add_adapter(tag, ref.adapter_dir)
        self.nbytes += self.multi.adapter_bytes(tag)

    def _unregister(self, tag: str) -> None:
        self.nbytes -= self.multi.adapter_bytes(tag)
        self.multi.remove_adapter(tag)

    def forward(self, tags: list, **inputs: Any) -> torch.Tensor:
        self.multi.set_batch(tags, self.serving_rank)
        return self.model(**inputs).logits


class LoraLane(_AdapterLane):
    """LoRA adapters of one base under HF PEFT, mixed per row with ``adapter_names``."""

    BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch

    def __init__(self, key, model, tokenizer, *, max_adapters: int) -> None:
        super().__init__(key, model, tokenizer, max_adapters=max_adapters)
        self.peft = None  # wraps the model at the first adapter

    def _register(self, tag: str, ref: ModelRef) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, ref.adapter_dir, adapter_name=tag).eval()
        else:
            self.peft.load_adapter(ref.adapter_dir, adapter_name=tag)
        self.peft.requires_grad_(False)
        self.nbytes = model_bytes(self.peft)

    def _unregister(self, tag: str) -> None:
        self.peft.delete_adapter(tag)
        self.nbytes = model_bytes(self.peft)

    def forward(self, tags: list, **inputs: Any) -> torch.Tensor:
        if self.peft is None:
            return self.model(**inputs).logits
        names = [self.BASE if t is None else t for t in tags]
        return self.peft(**inputs, adapter_names=names).logits


class ModelLane(Lane):
    """A model serving one fine-tune (or a classifier) on its own."""


class EncoderLane(Lane):
    """An encoder (a base, or a classification fine-tune's body) serving embeddings, pooled as ``pooling``."""

    def __init__(self, key, model, tokenizer, pooling: str, max_length: int | None = None) -> None:
        super().__init__(key, model, tokenizer, task="embedding")
        self.pooling = pooling
        if max_length is not None:
            self.context_length = min(self.context_length, max_length)
