"""The key/value cache of a batch whose rows start at different times: left-padded, merged, shrunk.

Every row's tokens end at the right edge of the cache; a row that is shorter than the longest one is padded
on the left, and the attention mask (batch, length) marks its real positions. Position ids are tracked per
row by the caller, so padding never shifts a row's positions. This is what lets a row join a batch that is
already decoding (continuous batching): prefill it alone or with other newcomers, then ``merge``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class PaddedCache:
    """A ``DynamicCache`` plus its (batch, length) attention mask. Keys/values are (batch, heads, length, dim)."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def extend_mask(self) -> torch.Tensor:
        """The mask for a decode step: one more real position per row. Kept as the new mask."""
        ones = torch.ones(self.batch, 1, dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask

    def merge(self, other: PaddedCache) -> None:
        """Append ``other``'s rows after this cache's rows, left-padding whichever is shorter."""
        length = max(self.length, other.length)
        pad_self, pad_other = length - self.length, length - other.length
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, pad_self, 2), _pad_left(theirs.keys, pad_other, 2)], 0)
            mine.values = torch.cat([_pad_left(mine.values, pad_self, 2), _pad_left(theirs.values, pad_other, 2)], 0)
        self.mask = torch.cat([_pad_left(self.mask, pad_self, 1), _pad_left(other.mask, pad_other, 1)], 0)

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order) and drop the leading columns no kept row uses."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = mask[:, start:]


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) for prompts of different lengths, padded on the left."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, length - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def cache_argument(model: nn.Module) -> str:
    """The name ``model.forward`` takes its key/value cache by: transformers 5 renames ``past_key_values`` to
    ``cache`` (the old name goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
