"""Log probabilities of generated tokens, for the `logprobs` options of completions and chat completions.

Each figure is the model's own distribution at that step: the log-softmax of the raw logits, before
temperature, top-p and the penalties reshape it for sampling (what vLLM reports by default). A row asks for
the chosen token's log probability and those of the k most likely tokens (k = 0..20). An echoed prompt
(completions' ``echo``) gets the same for each of its tokens after the first, from the prefill's logits.

Tokens are named as OpenAI names them: their text, and their exact UTF-8 bytes. For byte-level BPE
tokenizers (GPT-2, Llama 3, SmolLM2) the bytes come from the token's byte symbols, so a token that holds half
of a multi-byte character still reports its true bytes (its text then shows U+FFFD, as OpenAI's does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import decoders
from transformers import PreTrainedTokenizerBase

from serving.types import TokenLogprob


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte → printable-character table (GPT-2's ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


BYTE_DECODER = _byte_decoder()


class TokenNames:
    """Token id → (text, UTF-8 bytes) for one tokenizer, cached (a decode loop sees the same tokens often)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
        self._names: dict[int, tuple[str, tuple[int, ...]]] = {}

    def __call__(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        name = self._names.get(token_id)
        if name is None:
            name = self._names[token_id] = self._name(token_id)
        return name

    def _name(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        if self.byte_level and token_id not in self.tokenizer.all_special_ids:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece and all(ch in BYTE_DECODER for ch in piece):
                raw = bytes(BYTE_DECODER[ch] for ch in piece)
                return raw.decode("utf-8", errors="replace"), tuple(raw)
        text = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        return text, tuple(text.encode("utf-8"))


def step_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], wanted: Sequence[int | None], names: TokenNames
) -> list[TokenLogprob | None]:
    """For each row of ``logits`` (batch, vocab): None when ``wanted[i]`` is None, else the log probability
    of ``tokens[i]`` with the ``wanted[i]`` most likely tokens at that step."""
    rows = [i for i, k in enumerate(wanted) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(wanted)
    if not rows:
        return out
    logp = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logp.device)).squeeze(1).tolist()
    k_max = max(wanted[i] for i in rows)
    top_values = top_ids = None
    if k_max:
        values, ids = logp.topk(min(k_max, logp.shape[-1]), dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        top = ()
        if wanted[i]:
            top = tuple(
                TokenLogprob(*names(token_id), logprob)
                for token_id, logprob in zip(top_ids[j][: wanted[i]], top_values[j][: wanted[i]])
            )
        out[i] = TokenLogprob(*names(tokens[i]), chosen[j], top)
    return out


def prompt_logprobs(logits: torch.Tensor, ids: Sequence[int], k: int, names: TokenNames) -> tuple[TokenLogprob, ...]:
    """The log probability of each prompt token given the ones before it, from ``logits`` (len(ids), vocab):
    the model's outputs at the prompt's positions. The first token has none."""
    first = TokenLogprob(*names(ids[0]), None)
    if len(ids) < 2:
        return (first,)
    logp = torch.log_softmax(logits[: len(ids) - 1].float(), dim=-1)
    following = torch.tensor(list(ids[1:]), device=logp.device)
    chosen = logp.gather(1, following.unsqueeze(1)).squeeze(1).tolist()
    tops: list[tuple[TokenLogprob, ...]] = [()] * len(chosen)
    if k:
        values, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tops = [tuple(TokenLogprob(*names(t), v) for t, v in zip(row_ids, row_values))
                for row_ids, row_values in zip(top_ids.tolist(), values.tolist())]
    return (first, *(TokenLogprob(*names(t), lp, top) for t, lp, top in zip(ids[1:], chosen, tops)))
