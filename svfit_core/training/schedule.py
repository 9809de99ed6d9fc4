"""The learning-rate schedule: linear warmup, then linear or cosine decay, as a pure function of the step.

Because the multiplier depends on nothing but ``(step, total_steps, warmup_steps, kind)``, the step number
is the scheduler's whole state: a checkpoint stores it in JSON and resuming needs no scheduler object.
"""

from __future__ import annotations

import math

import torch


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Warmup ramps to 1 over ``warmup_steps`` starting above zero (step 0 already learns); decay then goes
    towards 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule {kind!r}")


def apply_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """Set every param group's lr from its own ``base_lr`` (groups differ: σ vs head)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
