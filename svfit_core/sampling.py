"""Choosing each row's next token: greedy at temperature 0, else temperature and nucleus (top-p) sampling
with a per-row random generator, so a request's ``seed`` reproduces its tokens whatever else is batched.
OpenAI's presence and frequency penalties lower the logits of tokens the row has already generated, and a
row's ``logit_bias`` shifts the logits of the tokens it names; both apply to greedy rows too. A row with a
``constraint`` (a grammar, say) may only choose the tokens it allows.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn


class TokenConstraint(Protocol):
    """Which tokens a row may choose next (``allowed``: a bool mask over ``vocab`` ids), told each token chosen
    (``advance``). Serving's grammars implement it (serving/structured.py)."""

    def allowed(self, vocab: int, device: torch.device) -> torch.Tensor: ...
    def advance(self, token: int) -> None: ...


class RowSampling(Protocol):
    """What sampling reads of a row being generated (serving/scheduler.Row); ``constraint`` is optional."""

    temperature: float
    top_p: float
    presence_penalty: float
    frequency_penalty: float
    generator: torch.Generator
    generated: list[int]
    logit_bias: tuple[tuple[int, float], ...]


def row_generator(seed: int | None, prompt_index: int, choice_index: int, device: torch.device) -> torch.Generator:
    """A generator for one choice. With a seed, choice j of prompt i always draws the same stream."""
    g = torch.Generator(device=device)
    if seed is None:
        g.manual_seed(secrets.randbits(63))
    else:
        # Mix the indices in so that n choices of one seeded request differ from each other.
        g.manual_seed((seed * 1_000_003 + prompt_index * 1_009 + choice_index) % (2**63))
    return g


def adjusted(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """``logits`` (batch, vocab) with each row's logit bias and penalties applied. The penalties are
    OpenAI's: a token generated c times so far loses c × frequency_penalty + (c > 0) × presence_penalty
    (the prompt does not count)."""
    penalize = [i for i, r in enumerate(rows) if r.generated and (r.presence_penalty or r.frequency_penalty)]
    bias = [i for i, r in enumerate(rows) if r.logit_bias]
    constrained = [i for i, r in enumerate(rows) if getattr(r, "constraint", None) is not None]
    if not penalize and not bias and not constrained:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in bias:
        ids, values = zip(*rows[i].logit_bias)
        logits[i, list(ids)] += torch.tensor(values, dtype=logits.dtype, device=logits.device)
    for i in penalize:
        row = rows[i]
        counts = torch.bincount(torch.tensor(row.generated, device=logits.device), minlength=vocab)[:vocab]
        counts = counts.to(logits.dtype)
        logits[i] -= row.frequency_penalty * counts + row.presence_penalty * (counts > 0).to(logits.dtype)
    for i in constrained:  # last: no bias or penalty brings a forbidden token back
        logits[i].masked_fill_(~rows[i].constraint.allowed(vocab, logits.device), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, rows: Sequence[RowSampling]) -> list[int]:
    """One token per row of ``logits`` (batch, vocab)."""
    logits = adjusted(logits.float(), rows)
    greedy = logits.argmax(-1).tolist()  # one batched argmax serves every greedy row
    out = []
    for i, row in enumerate(rows):
        temperature, top_p = row.temperature, row.top_p
        if temperature == 0:
            out.append(greedy[i])
            continue
        # Shifted so the largest logit is 0, and in float64 (where a temperature of 5e-324 is not 0): at a
        # tiny temperature the rest overflow to -inf and the softmax is one-hot, where logits / temperature
        # would be inf - inf = NaN and fail the step of every request batched with this one.
        scores = logits[i].double()
        probs = torch.softmax((scores - scores.max()) / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            cutoff = int((sorted_probs.cumsum(0) < top_p).sum().item()) + 1
            kept = sorted_probs[:cutoff]
            choice = torch.multinomial(kept / kept.sum(), 1, generator=row.generator)
            out.append(int(order[choice]))
        else:
            out.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    return out


def eos_token_ids(model: nn.Module, tokenizer) -> frozenset[int]:
    """Every id that ends a sequence: the tokenizer's EOS and the generation config's (which may be a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(value, int):
        ids.add(value)
    elif isinstance(value, (list, tuple)):
        ids.update(int(v) for v in value)
    return frozenset(ids)
