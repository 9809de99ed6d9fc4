"""Choosing each row's next token: greedy at temperature 0, else temperature and nucleus (top-p) sampling
with a per-row random generator, so a request's ``seed`` reproduces its tokens whatever else is batched.
"""

from __future__ import annotations

import secrets

import torch


def row_generator(seed: int | None, prompt_index: int, choice_index: int, device: torch.device) -> torch.Generator:
    """A generator for one choice. With a seed, choice j of prompt i always draws the same stream."""
    g = torch.Generator(device=device)
    if seed is None:
        g.manual_seed(secrets.randbits(63))
    else:
        # Mix the indices in so that n choices of one seeded request differ from each other.
        g.manual_seed((seed * 1_000_003 + prompt_index * 1_009 + choice_index) % (2**63))
    return g


def next_tokens(
    logits: torch.Tensor, temperatures: list[float], top_ps: list[float], generators: list[torch.Generator]
) -> list[int]:
    """One token per row of ``logits`` (batch, vocab)."""
    logits = logits.float()
    greedy = logits.argmax(-1).tolist()  # one batched argmax serves every greedy row
    out = []
    for i, (temperature, top_p) in enumerate(zip(temperatures, top_ps)):
        if temperature == 0:
            out.append(greedy[i])
            continue
        # Shifted so the largest logit is 0, and in float64 (where a temperature of 5e-324 is not 0): at a
        # tiny temperature the rest overflow to -inf and the softmax is one-hot, where logits / temperature
        # would be inf - inf = NaN and fail the step of every request batched with this one.
        row = logits[i].double()
        probs = torch.softmax((row - row.max()) / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            cutoff = int((sorted_probs.cumsum(0) < top_p).sum().item()) + 1
            kept = sorted_probs[:cutoff]
            choice = torch.multinomial(kept / kept.sum(), 1, generator=generators[i])
            out.append(int(order[choice]))
        else:
            out.append(int(torch.multinomial(probs, 1, generator=generators[i])))
    return out
