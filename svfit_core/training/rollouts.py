"""Sampling answers from the model being trained, for reinforcement fine-tuning: a batch of prompts in, one
answer's token ids per prompt out.

It decodes the way the serving engine does, with the same left-padded key/value cache (``svfit_core.kv_cache``)
and the same token choice (``svfit_core.sampling``), so the answers a run learns from are the answers its
model gives once served. A row stops at an end-of-turn token (kept: it is part of the answer the model is
trained to give) or at ``max_tokens``; finished rows leave the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from svfit_core.kv_cache import PaddedCache, cache_argument, left_pad
from svfit_core.sampling import next_tokens
from svfit_core.training.loss import transformers_model

__all__ = ["sample_answers"]


@dataclass
class _Row:
    """One answer being sampled, in the shape ``sampling.next_tokens`` reads (no penalties, no bias)."""

    temperature: float
    generator: torch.Generator
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    generated: list[int] = field(default_factory=list)


@torch.no_grad()
def sample_answers(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_tokens: int,
    temperature: float,
    stop_ids: frozenset[int],
    pad_id: int,
    device: torch.device,
    generators: list[torch.Generator],
    autocast,
) -> list[list[int]]:
    """One sampled answer per prompt (``generators[i]`` draws row i's tokens; temperature 0 is greedy)."""
    rows = [_Row(temperature, g) for g in generators]
    ids, mask, positions = left_pad(prompts, pad_id, device)
    cache = PaddedCache(DynamicCache(), mask)
    cache_name = cache_argument(transformers_model(model))  # a wrapper (SVFit, PEFT) passes keywords through
    with autocast():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{cache_name: cache.cache}).logits[:, -1]
    active = list(range(len(prompts)))  # rows still sampling, in the cache's row order
    while active:
        chosen = next_tokens(logits, [rows[i] for i in active])
        keep = []
        for j, i in enumerate(active):
            rows[i].generated.append(chosen[j])
            if chosen[j] not in stop_ids and len(rows[i].generated) < max_tokens:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):
            cache.select(keep)
            active = [active[j] for j in keep]
        mask = cache.extend_mask()
        tokens = torch.tensor([[rows[i].generated[-1]] for i in active], dtype=torch.long, device=device)
        # A row's next position counts its own tokens only: padding never shifts it.
        at = torch.tensor([[len(prompts[i]) + len(rows[i].generated) - 1] for i in active], device=device)
        with autocast():
            logits = model(input_ids=tokens, attention_mask=mask, position_ids=at, use_cache=True,
                           **{cache_name: cache.cache}).logits[:, -1]
    return [row.generated for row in rows]
