"""Batching: the order examples are seen in, how a batch splits into micro-batches, and padding.

The order of epoch ``e`` is a permutation drawn from a generator seeded with ``(shuffle_seed, e)`` alone, so
the data position of a checkpoint is just ``(epoch, batch index)``: resuming recomputes the same order
without storing it. Each batch is padded to its own longest row (right padding), not to max_seq_length.
"""

from __future__ import annotations

import numpy as np
import torch

from svfit_core.training.encoding import IGNORE_INDEX, Encoded, count_targets


def epoch_batches(num_examples: int, batch_size: int, shuffle_seed: int, epoch: int) -> list[list[int]]:
    """Example indices of every batch of an epoch; the last batch may be short."""
    order = np.random.default_rng([shuffle_seed, epoch]).permutation(num_examples).tolist()
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


def micro_batches(
    batch: list[int], examples: list[Encoded], accumulation_steps: int, max_tokens: int
) -> list[list[int]]:
    """Split one optimizer batch into micro-batches: first into ``accumulation_steps`` parts of (nearly)
    equal row counts, then each part into runs whose padded size (rows × longest row) is at most
    ``max_tokens``. A row longer than ``max_tokens`` goes alone; rows are never cut.

    Rows are grouped by length first so each micro-batch pads little; the split changes memory use, not
    the result, because the loss is normalised over the whole batch (see ``loop._train_step``). An empty
    batch (a data-parallel rank's share of a step with fewer examples than ranks) has none.
    """
    if not batch:
        return []
    by_length = sorted(batch, key=lambda i: len(examples[i]))
    parts = np.array_split(np.array(by_length, dtype=np.int64), min(accumulation_steps, len(batch)))
    split: list[list[int]] = []
    for part in parts:
        current: list[int] = []
        for i in part.tolist():
            # Ascending lengths: the row being added is the longest, so it sets the padded width.
            if current and (len(current) + 1) * len(examples[i]) > max_tokens:
                split.append(current)
                current = []
            current.append(i)
        if current:
            split.append(current)
    return split


def collate(rows: list[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad rows to the longest one. Causal rows pad their labels with IGNORE_INDEX."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.tensor(row.input_ids, dtype=torch.long)
        attention_mask[r, : len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if rows[0].token_type_ids is not None:
        token_type_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            token_type_ids[r, : len(row)] = torch.tensor(row.token_type_ids, dtype=torch.long)
        batch["token_type_ids"] = token_type_ids
    if isinstance(rows[0].labels, int):
        batch["labels"] = torch.tensor([row.labels for row in rows], dtype=torch.long)
    else:
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, row in enumerate(rows):
            labels[r, : len(row)] = torch.tensor(row.labels, dtype=torch.long)
        batch["labels"] = labels
    return batch


def batch_targets(rows: list[Encoded]) -> int:
    """Predictions a batch contributes to the loss: tokens for causal rows, rows for classification."""
    return sum(count_targets(row) for row in rows)
