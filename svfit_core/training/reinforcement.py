"""Reinforcement fine-tuning (GRPO, Shao et al. 2024): learn from graded samples of the model's own answers.

Each step takes a batch of prompts, samples ``samples_per_prompt`` answers to each from the model being trained
(``rollouts.py``), and asks the caller's ``reward`` function to grade them. An answer's advantage is its
reward standardised within its prompt's group: better than its siblings pushes its tokens up, worse pushes them
down, and a group whose answers all scored the same teaches nothing. The loss per answer token is

    -min(ratio · A, clip(ratio, 1 - ε, 1 + ε) · A) + kl_coef · (exp(d) - d - 1),  d = log ref - log π,

averaged over each answer's tokens and over the answers. ``ratio`` is π over the policy that sampled the
answers; every batch of samples here makes one update, so at that update the ratio is exactly 1 and the
clip never binds (it would with several updates per batch). The KL term (Schulman's k3 estimator, always ≥ 0)
holds the policy near the reference: the starting model, which SVFit and LoRA get by switching the adapter
off for a forward pass (no second copy) and full fine-tuning keeps as a frozen copy.

Randomness: answer j to example i at step s draws from its own generator seeded by (seed, s, i, j), so a
resumed run samples exactly what the uninterrupted one did; evaluation draws (seed, i, j) at every
evaluation, so the validation curve compares the same draws of a changing model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from svfit_core.training.collate import collate, micro_batches
from svfit_core.training.encoding import IGNORE_INDEX, Encoded, EncodedPrompt
from svfit_core.training.loss import causal_targets, chunked_token_logprobs
from svfit_core.training.rollouts import sample_answers

__all__ = [
    "Reward",
    "RolloutSetup",
    "answer_rows",
    "clipped_surrogate",
    "evaluate_prompts",
    "group_advantages",
    "policy_loss",
    "reinforcement_gradients",
    "sequence_reference",
]

# Grades a batch of answers: (the prompts' lines, as ``item``; each answer's text) -> one score per answer.
# Called with the lines repeated once per answer.
Reward = Callable[[list[dict], list[str]], Sequence[float]]

# Keeps a group whose rewards barely differ from dividing by (almost) zero.
_STD_FLOOR = 1e-6


@dataclass
class RolloutSetup:
    """What sampling and the loss need of a run (``loop._Run`` builds it)."""

    model: nn.Module
    tokenizer: object
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    reward: Reward
    # log π_ref of each target token of a batch (T,): the adapter switched off, or the frozen copy.
    reference_logprobs: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None
    stop_ids: frozenset[int]
    seed: int
    samples_per_prompt: int
    eval_samples: int
    max_completion_tokens: int
    temperature: float
    kl_coef: float
    clip_epsilon: float
    max_tokens_per_micro_batch: int
    accumulation_steps: int


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages: each reward minus its group's mean, over the group's standard
    deviation. A group of equal rewards gets zeros."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return torch.where(std > _STD_FLOOR, (rewards - mean) / std.clamp(min=_STD_FLOOR), torch.zeros_like(rewards))


def answer_rows(prompts: list[list[int]], answers: list[list[int]]) -> list[Encoded]:
    """Causal rows of prompt + answer, trained on the answer's tokens only."""
    return [Encoded(p + a, [IGNORE_INDEX] * len(p) + a) for p, a in zip(prompts, answers, strict=True)]


def clipped_surrogate(
    logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, advantages: torch.Tensor, clip_epsilon: float
) -> torch.Tensor:
    """PPO's per-token objective min(ratio · A, clip(ratio, 1 - ε, 1 + ε) · A), ratio = π / π_sampling: a token
    whose probability already moved ε past the sampling policy in the advantage's direction stops pulling."""
    ratio = torch.exp(logprobs - sampling_logprobs)
    return torch.minimum(ratio * advantages, ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * advantages)


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log π of each target token of a batch (T,) in fp32, and the row each belongs to (T,)."""
    hidden, targets, head, rows = causal_targets(model, batch)
    return chunked_token_logprobs(hidden, targets, head), rows


def policy_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    advantages: torch.Tensor,
    reference: torch.Tensor | None,
    clip_epsilon: float,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a batch of B answer rows and their advantages (B,): the loss summed over answers (each answer's
    token mean) and the KL estimate summed likewise (0 without a ``reference``, (T,) target-token log-probs)."""
    logprobs, rows = token_logprobs(model, batch)  # (T,), (T,)
    # The sampling policy is this one, before the update: the ratio is 1, its gradient A · ∇log π.
    per_token = -clipped_surrogate(logprobs, logprobs.detach(), advantages.to(logprobs.device)[rows], clip_epsilon)
    kl = torch.zeros_like(logprobs)
    if reference is not None:
        d = reference.to(logprobs.device) - logprobs
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * kl
    count = advantages.shape[0]
    lengths = torch.zeros(count, device=logprobs.device).index_add(0, rows, torch.ones_like(logprobs)).clamp(min=1)
    per_answer = torch.zeros(count, device=logprobs.device).index_add(0, rows, per_token) / lengths
    kl_per_answer = torch.zeros(count, device=logprobs.device).index_add(0, rows, kl.detach()) / lengths
    return per_answer.sum(), kl_per_answer.sum()


def _generators(setup: RolloutSetup, key: Sequence[int], count: int) -> list[torch.Generator]:
    out = []
    for j in range(count):
        g = torch.Generator(device=setup.device)
        g.manual_seed(hash((setup.seed, *key, j)) % (2**63))
        out.append(g)
    return out


def _sample(setup: RolloutSetup, prompts: list[EncodedPrompt], keys: list[tuple[int, ...]], n: int) -> list[list[int]]:
    """``n`` answers to each prompt, prompt-major (the n answers to prompts[0] first)."""
    was_training = setup.model.training
    setup.model.eval()
    try:
        return sample_answers(
            setup.model, [p.input_ids for p in prompts for _ in range(n)],
            max_tokens=setup.max_completion_tokens, temperature=setup.temperature, stop_ids=setup.stop_ids,
            pad_id=setup.tokenizer.pad_token_id, device=setup.device,
            generators=[g for key in keys for g in _generators(setup, key, n)], autocast=setup.autocast,
        )
    finally:
        setup.model.train(was_training)


def _grade(setup: RolloutSetup, prompts: list[EncodedPrompt], answers: list[list[int]], n: int) -> torch.Tensor:
    """The rewards (P, n) of ``n`` answers per prompt. The text graded is the answer without its stop token."""
    texts = [setup.tokenizer.decode([t for t in a if t not in setup.stop_ids], skip_special_tokens=True)
             for a in answers]
    items = [p.item for p in prompts for _ in range(n)]
    scores = [float(s) for s in setup.reward(items, texts)]
    if len(scores) != len(texts):
        raise ValueError(f"the reward function returned {len(scores)} scores for {len(texts)} answers")
    return torch.tensor(scores, dtype=torch.float32).view(len(prompts), n)


def reinforcement_gradients(
    setup: RolloutSetup, prompts: list[EncodedPrompt], indices: list[int], step: int, answers_in_batch: int
) -> dict:
    """Sample, grade and accumulate the gradients of one step's ``prompts`` (example ``indices``), the loss
    divided by ``answers_in_batch`` (every answer of the whole optimizer batch). Returns the step's sums:
    loss, reward, kl, answers, tokens, answer_tokens."""
    n = setup.samples_per_prompt
    answers = _sample(setup, prompts, [(step, i) for i in indices], n)
    rewards = _grade(setup, prompts, answers, n)
    advantages = group_advantages(rewards).flatten()
    rows = answer_rows([p.input_ids for p in prompts for _ in range(n)], answers)
    sums = {"loss": 0.0, "reward": float(rewards.sum()), "kl": 0.0, "answers": len(rows),
            "tokens": sum(len(r) for r in rows), "answer_tokens": sum(len(a) for a in answers)}
    pad = setup.tokenizer.pad_token_id
    for micro in micro_batches(list(range(len(rows))), rows, setup.accumulation_steps,
                               setup.max_tokens_per_micro_batch):
        batch = {k: v.to(setup.device) for k, v in collate([rows[i] for i in micro], pad).items()}
        reference = None
        if setup.reference_logprobs is not None and setup.kl_coef > 0:
            with torch.no_grad(), setup.autocast():
                reference = setup.reference_logprobs(batch)
        with setup.autocast():
            loss_sum, kl_sum = policy_loss(setup.model, batch, advantages[torch.tensor(micro)], reference,
                                           setup.clip_epsilon, setup.kl_coef)
        (loss_sum / answers_in_batch).backward()
        sums["loss"] += loss_sum.item()
        sums["kl"] += kl_sum.item()
    return sums


@torch.no_grad()
def evaluate_prompts(setup: RolloutSetup, prompts: list[EncodedPrompt], batch_size: int) -> dict:
    """The mean reward of ``eval_samples`` answers to each prompt, sampled ``batch_size`` prompts at a time."""
    n = setup.eval_samples
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        keys = [(-1, start + k) for k in range(len(chunk))]  # -1: no training step draws these
        rewards = _grade(setup, chunk, _sample(setup, chunk, keys, n), n)
        total, count = total + float(rewards.sum()), count + rewards.numel()
    return {"reward": total / max(1, count)}


def sequence_reference(model: nn.Module, frozen: nn.Module | None) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """log π_ref of a batch's target tokens: ``frozen``'s when given (full fine-tuning), else ``model``'s with its
    adapter switched off (SVFit's ``disable_adapter``, PEFT's)."""

    if frozen is not None:
        return lambda batch: token_logprobs(frozen, batch)[0]

    def switched_off(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with model.disable_adapter():
            return token_logprobs(model, batch)[0]

    return switched_off
