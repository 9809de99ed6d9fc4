"""Engine results in OpenAI's wire shapes where a plain schema does not say it all: the log-probability
objects of chat (``content`` entries with ``top_logprobs``) and of legacy completions (parallel lists with
running text offsets, chunk by chunk), and embeddings as base64.
"""

from __future__ import annotations

import array
import base64
import sys
from collections.abc import Sequence

from serving.types import TokenLogprob


def _chat_token(entry: TokenLogprob, with_top: bool = True) -> dict:
    out = {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.bytes)}
    if with_top:
        out["top_logprobs"] = [_chat_token(alt, with_top=False) for alt in entry.top]
    return out


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict:
    return {"content": [_chat_token(e) for e in entries], "refusal": None}


class CompletionLogprobsWriter:
    """The legacy completions `logprobs` object, chunk by chunk: ``text_offset`` runs on across a choice's
    chunks (offsets count the token texts from the start of the answer, an echoed prompt included)."""

    def __init__(self, with_top: bool) -> None:
        self.with_top = with_top
        self.offsets: dict[int, int] = {}

    def __call__(self, index: int, entries: Sequence[TokenLogprob]) -> dict:
        offset = self.offsets.get(index, 0)
        text_offset = []
        for entry in entries:
            text_offset.append(offset)
            offset += len(entry.token)
        self.offsets[index] = offset
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            # An echoed prompt's first token has no log probability and no alternatives: null, as OpenAI's.
            "top_logprobs": [None if e.logprob is None else {alt.token: alt.logprob for alt in e.top}
                             for e in entries] if self.with_top else None,
            "text_offset": text_offset,
        }


def base64_floats(vector: list[float]) -> str:
    """OpenAI's base64 form: the float32 values, little-endian, base64-encoded."""
    floats = array.array("f", vector)
    if sys.byteorder == "big":
        floats.byteswap()
    return base64.b64encode(floats.tobytes()).decode("ascii")
