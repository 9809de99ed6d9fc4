"""How much of an optimizer step fits on the device at once: the token budget of a micro-batch and whether
activations need checkpointing, from free device memory and the model's shape.

The estimate only has to be about right. A micro-batch that still runs out of memory is retried smaller
(``loop._train_step``), so an estimate that is too large costs one retry, and one too small costs speed.

Also the estimate before anything is loaded (``estimate_memory``): a run's device bytes by part, from the
base's config alone, which the pre-flight check (``preflight.py``) and the benchmarks read.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from svfit_core.layer import band_size
from svfit_core.loading import DTYPES, max_positions
from svfit_core.targets import classification_modules, resolve_targets
from svfit_core.training.loss import LOSS_CHUNK_TOKENS, transformers_model
from svfit_core.training.methods import get_method
from svfit_core.training.run_config import PeftSpec, TrainConfig

# CPU runs are tiny models (tests, demos) and RAM is not probed: a budget that holds a batch of 64 rows of
# 512 tokens at once, as the loop did before it split by tokens.
CPU_TOKENS_PER_MICRO_BATCH = 32_768
# The share of free device memory the estimate may plan for: the rest absorbs the caching allocator's
# fragmentation, cuBLAS workspaces and what the estimate leaves out (embeddings, norms' fp32 upcasts).
USABLE_FRACTION = 0.8
# Activations one token keeps for backward in one decoder layer, counted in tensors of the compute dtype
# (after Korthikanti et al. 2022, "Reducing Activation Recomputation", with fused attention keeping no
# seq × seq scores): about 12 hidden-sized ones (two norms' inputs and outputs, q, k, v, the attention
# output, the inputs of the output and MLP projections) and 4 of the MLP's intermediate width (gate, up,
# activation, their product).
HIDDEN_TENSORS_PER_LAYER = 12
INTERMEDIATE_TENSORS_PER_LAYER = 4
# Each adapted matrix also keeps its adapter's inner products per token: SVFit's (x V_r) and its scaled
# copy, two vectors of r.
ADAPTER_TENSORS = 2
# Per trainable parameter, beyond the parameter itself: its gradient and AdamW's two moments.
OPTIMIZER_COPIES = 3

__all__ = ["CPU_TOKENS_PER_MICRO_BATCH", "MemoryPlan", "activation_bytes_per_token", "estimate_memory",
           "free_device_memory", "loss_chunk_bytes", "plan_memory", "shape_model"]


@dataclass(frozen=True)
class MemoryPlan:
    tokens_per_micro_batch: int
    gradient_checkpointing: bool


def activation_bytes_per_token(model: nn.Module, *, compute_bytes: int, adapter_width: int,
                               checkpointing: bool) -> int:
    """Bytes of activations one token of a micro-batch keeps until backward.

    ``adapter_width`` is Σ r over the adapted matrices (0 for methods without adapters, and negligible for
    LoRA's small ranks). With checkpointing each layer keeps only its input, and one layer at a time holds
    its full set while it is recomputed.
    """
    config = transformers_model(model).config.get_text_config()
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    per_layer = HIDDEN_TENSORS_PER_LAYER * hidden + INTERMEDIATE_TENSORS_PER_LAYER * intermediate
    adapters = ADAPTER_TENSORS * adapter_width
    if checkpointing:
        return compute_bytes * (layers * hidden + per_layer + adapters // max(1, layers))
    return compute_bytes * (layers * per_layer + adapters)


def loss_chunk_bytes(tokens: int, vocab: int, compute_bytes: int) -> int:
    """One loss chunk of ``tokens`` rows at its peak: the logits in the compute dtype, their fp32 copy and the
    fp32 softmax gradient (the chunk's backward recomputes them, one chunk at a time)."""
    return tokens * vocab * (compute_bytes + 4 + 4)


def free_device_memory(device: torch.device) -> int:
    """Bytes a CUDA device can still give this process: free on the device plus what PyTorch's caching
    allocator holds unused (blocks left over from loading and the SVDs)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def plan_memory(
    model: nn.Module,
    device: torch.device,
    *,
    trainable: list[torch.Tensor],
    compute_bytes: int,
    adapter_width: int,
    longest_row: int,
    max_tokens: int | None,
    checkpointing: bool | None,
) -> MemoryPlan:
    """Fill in what the config left automatic (None): the token budget and gradient checkpointing.

    On CUDA the usable memory is ``USABLE_FRACTION`` of what is free once the model is on the device, less
    the gradients and AdamW moments of ``trainable`` and one loss chunk's logits; checkpointing goes on
    when one row of ``longest_row`` tokens would not fit without it, and the budget is the usable memory
    over ``activation_bytes_per_token``. Elsewhere checkpointing stays off and the budget is
    ``CPU_TOKENS_PER_MICRO_BATCH``.
    """
    if device.type != "cuda":
        return MemoryPlan(max_tokens or CPU_TOKENS_PER_MICRO_BATCH, bool(checkpointing))
    vocab = transformers_model(model).config.get_text_config().vocab_size
    optimizer_bytes = OPTIMIZER_COPIES * sum(p.numel() * p.element_size() for p in trainable)
    loss_bytes = loss_chunk_bytes(LOSS_CHUNK_TOKENS, vocab, compute_bytes)
    usable = int(free_device_memory(device) * USABLE_FRACTION) - optimizer_bytes - loss_bytes

    def per_token(on: bool) -> int:
        return activation_bytes_per_token(model, compute_bytes=compute_bytes, adapter_width=adapter_width,
                                          checkpointing=on)

    if checkpointing is None:
        checkpointing = longest_row * per_token(False) > usable
    if max_tokens is None:
        max_tokens = max(1, usable // per_token(checkpointing))
    return MemoryPlan(max_tokens, checkpointing)


# -- the estimate before loading ------------------------------------------------------------------------------


def shape_model(model_config: dict, task: str = "causal", num_labels: int | None = None) -> PreTrainedModel:
    """The model ``model_config`` (a ``config.json`` as a dict) describes, built on the meta device: every
    module and parameter shape, and no memory. Cached, so the pre-flight's searches build it once."""
    return _shape_model(json.dumps(model_config, sort_keys=True), task, num_labels)


@functools.lru_cache(maxsize=4)
def _shape_model(config_json: str, task: str, num_labels: int | None) -> PreTrainedModel:
    fields = json.loads(config_json)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if task == "classification":
        config.num_labels = num_labels
    auto = AutoModelForCausalLM if task == "causal" else AutoModelForSequenceClassification
    with torch.device("meta"):
        return auto.from_config(config)


def estimate_memory(
    model_config: dict, spec: PeftSpec, config: TrainConfig, *, task: str = "causal", num_labels: int | None = None,
    objective: str = "supervised",
) -> dict[str, int]:
    """Device bytes of a run's smallest step, one example of ``max_seq_length`` tokens, by part; computed from
    the base's config alone, before anything is loaded. A DPO example is a pair, two such rows in one pass; a
    reinforcement example's smallest step is one sampled answer's row, but full fine-tuning keeps a frozen copy
    of the base as its reference. The parts are the tensors the run builds (the modules come from
    ``shape_model``, the targets from ``spec`` by the run's own rule):

    - ``base``: every parameter of the loaded model in ``config.base_dtype`` (a classifier's head and
      pooler in fp32), twice for full fine-tuning by reinforcement with a KL term;
    - ``bases``: SVFit's U_r, V_r in the base dtype and s in fp32, per target, at the largest r the spec
      allows (r = k = min(m, n) under an energy rule, which picks r only once it sees the spectrum);
    - ``trainable``: what the method adds that trains, in fp32: σ (r per target, plus 2·Σ_j (r − j) with a
      band), LoRA's A and B;
    - ``gradients`` and ``optimizer`` (AdamW's two moments), fp32, of everything that trains;
    - ``activations``: the example's, by ``activation_bytes_per_token``;
    - ``loss``: one loss chunk of the example's tokens (a classifier's few logits count as nothing);
    - ``total``.

    ``config`` is resolved as the run holds it: a concrete ``base_dtype``, and ``bf16`` and
    ``gradient_checkpointing`` decided (None counts as off).
    """
    model = shape_model(model_config, task, num_labels)
    dtype = DTYPES[config.base_dtype]
    with_pooler = get_method(spec.method).head_includes_pooler
    heads = classification_modules(model, with_pooler=with_pooler) if task == "classification" else []
    head_params = {id(p) for name in heads for p in model.get_submodule(name).parameters()}
    params = list(model.parameters())
    base = sum(p.numel() * (4 if id(p) in head_params else dtype.itemsize) for p in params)
    trained = sum(p.numel() for p in params if spec.method == "full" or id(p) in head_params)

    bases = added = adapter_width = 0
    if spec.method in ("svfit", "lora", "pissa"):
        resolved = spec.resolved()
        for m, n in _target_shapes(model, resolved.target_modules):
            if spec.method == "svfit":
                r = min(resolved.rank or m, m, n)  # no rank (all k, or an energy rule): r = k at worst
                bases += (m + n) * r * dtype.itemsize + 4 * r  # U (m, r), V (n, r), s (r,)
                added += r + band_size(r, spec.band)  # σ, and a banded coupling's off-diagonals
                adapter_width += r
            else:
                added += resolved.rank * (m + n)  # A (r, n), B (m, r)
        trained += added

    if objective == "reinforcement" and spec.method == "full" and config.kl_coef > 0:
        base *= 2  # the frozen reference copy
    tokens = config.max_seq_length
    positions = max_positions(model)
    if positions is not None:
        tokens = min(tokens, positions)  # the run truncates rows to the position embeddings
    if objective == "dpo":
        tokens *= 2  # the pair's two rows
    compute_bytes = 2 if config.bf16 else dtype.itemsize
    per_token = activation_bytes_per_token(model, compute_bytes=compute_bytes, adapter_width=adapter_width,
                                           checkpointing=bool(config.gradient_checkpointing))
    loss = 0
    if task == "causal":
        vocab = transformers_model(model).config.get_text_config().vocab_size
        loss = loss_chunk_bytes(min(tokens, LOSS_CHUNK_TOKENS), vocab, compute_bytes)
    parts = {
        "base": base,
        "bases": bases,
        "trainable": 4 * added,
        "gradients": 4 * trained,
        "optimizer": 4 * (OPTIMIZER_COPIES - 1) * trained,
        "activations": tokens * per_token,
        "loss": loss,
    }
    return {**parts, "total": sum(parts.values())}


def _target_shapes(model: nn.Module, target_modules: list[str] | str | None) -> list[tuple[int, int]]:
    """(out, in) of each matrix ``target_modules`` selects; a GPT-2 ``Conv1D`` stores its weight (in, out)."""
    shapes = []
    for name in resolve_targets(model, target_modules):
        module = model.get_submodule(name)
        rows, cols = module.weight.shape
        shapes.append((cols, rows) if isinstance(module, Conv1D) else (rows, cols))
    return shapes
