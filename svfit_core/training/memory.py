"""How much of an optimizer step fits on the device at once: the token budget of a micro-batch and whether
activations need checkpointing, from free device memory and the model's shape.

The estimate only has to be about right. A micro-batch that still runs out of memory is retried smaller
(``loop._train_step``), so an estimate that is too large costs one retry, and one too small costs speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from svfit_core.training.loss import LOSS_CHUNK_TOKENS, transformers_model

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

__all__ = ["CPU_TOKENS_PER_MICRO_BATCH", "MemoryPlan", "activation_bytes_per_token", "free_device_memory",
           "plan_memory"]


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
    # One chunk's logits in the compute dtype, their fp32 copy and the fp32 softmax gradient.
    loss_bytes = LOSS_CHUNK_TOKENS * vocab * (compute_bytes + 4 + 4)
    usable = int(free_device_memory(device) * USABLE_FRACTION) - optimizer_bytes - loss_bytes

    def per_token(on: bool) -> int:
        return activation_bytes_per_token(model, compute_bytes=compute_bytes, adapter_width=adapter_width,
                                          checkpointing=on)

    if checkpointing is None:
        checkpointing = longest_row * per_token(False) > usable
    if max_tokens is None:
        max_tokens = max(1, usable // per_token(checkpointing))
    return MemoryPlan(max_tokens, checkpointing)
