"""Direct preference optimisation (DPO, Rafailov et al. 2023): the loss of a batch of preference pairs, and
the reference log-probabilities it compares against.

A pair is two causal rows, the context followed by the preferred ("chosen") and by the non-preferred
("rejected") answer. The policy's log-probability of an answer is the sum over its tokens; the pair's loss is

    -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))),

log 2 when the policy is the reference. ``beta * (log pi - log ref)`` is an answer's implicit reward.

The reference is the model training starts from. Every method here starts from exactly that model (SVFit's
σ at s, LoRA's B at zero, full fine-tuning at the base weights), so the reference log-probabilities are
computed once, by the model itself before its first step, and kept with each checkpoint: no second copy of
the model, and a resumed run compares against the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from svfit_core.training.collate import collate
from svfit_core.training.encoding import EncodedPreference
from svfit_core.training.loss import causal_targets, chunked_token_logprobs

__all__ = [
    "REFERENCE_FILE",
    "REWARD_METRICS",
    "collate_pairs",
    "load_reference",
    "preference_loss",
    "reference_logprobs",
    "save_reference",
    "sequence_logprobs",
]

# A checkpoint's copy of the reference log-probabilities: (N, 2) per split, chosen then rejected.
REFERENCE_FILE = "reference_logprobs.safetensors"
# The sums a preference batch reports beside its loss and correct count, in this order.
REWARD_METRICS = ("chosen_reward", "rejected_reward")


def collate_pairs(pairs: list[EncodedPreference], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2P rows: the P chosen rows, then the P rejected ones."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id)


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ log p(token) over each row's target tokens, in fp32 (B,). A row with no target scores 0."""
    hidden, targets, head, rows = causal_targets(model, batch)
    token_logprobs = chunked_token_logprobs(hidden, targets, head)  # (T,)
    sums = torch.zeros(batch["labels"].shape[0], device=token_logprobs.device, dtype=torch.float32)
    return sums.index_add(0, rows, token_logprobs)


def preference_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a ``collate_pairs`` batch of P pairs and their reference log-probabilities (P, 2): the summed
    DPO loss, the number of pairs whose chosen reward is above the rejected one, and the summed rewards
    (2,), in ``REWARD_METRICS`` order."""
    logprobs = sequence_logprobs(model, batch)  # (2P,)
    pairs = reference.shape[0]
    policy = torch.stack([logprobs[:pairs], logprobs[pairs:]], dim=1)  # (P, 2)
    rewards = beta * (policy - reference.to(policy.device))  # (P, 2)
    margins = rewards[:, 0] - rewards[:, 1]  # (P,)
    loss_sum = -F.logsigmoid(margins).sum()
    correct = (margins > 0).sum()
    return loss_sum, correct, rewards.detach().sum(0)


@torch.no_grad()
def reference_logprobs(
    model: nn.Module, pairs: list[EncodedPreference], micro_batches: list[list[int]], pad_token_id: int,
    device: torch.device, autocast,
) -> torch.Tensor:
    """The (N, 2) log-probabilities of each pair's two answers under ``model`` in eval mode, computed in the
    given micro-batches (lists of pair indices) under the training step's ``autocast``."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    for micro in micro_batches:
        batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in micro], pad_token_id).items()}
        with autocast():
            logprobs = sequence_logprobs(model, batch).cpu()
        index = torch.tensor(micro, dtype=torch.long)
        out[index, 0], out[index, 1] = logprobs[: len(micro)], logprobs[len(micro) :]
    model.train(was_training)
    return out


def save_reference(folder: Path, train: torch.Tensor, valid: torch.Tensor) -> None:
    save_file({"train": train.contiguous(), "valid": valid.contiguous()}, str(folder / REFERENCE_FILE))


def load_reference(folder: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A checkpoint's reference log-probabilities (train, valid), or None when it holds none."""
    path = folder / REFERENCE_FILE
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    return tensors["train"], tensors["valid"]
