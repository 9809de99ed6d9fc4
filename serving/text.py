"""Turning a row's generated token ids into text as they arrive, and cutting it at a stop sequence.

Decoding is incremental (only a short window of recent tokens is re-decoded each step) and holds back a
trailing incomplete character. Text that could be the beginning of a stop sequence is held back too, so a
stream never shows a client text that the final answer cuts. Streamed and non-streamed responses are both
built from the deltas this yields, so they are equal by construction.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

INCOMPLETE = "\ufffd"  # what decode yields for a multi-byte character cut in half


class TextTracker:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _decode_new(self) -> str:
        # Decoding a window that starts a few tokens back keeps tokenizer-specific joins (leading spaces,
        # byte fallback) the same as decoding the whole sequence.
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        full = self._decode(self.ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(INCOMPLETE):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text that may be shown now (possibly empty).

        After a stop sequence appears, ``stopped`` is True and the text ends just before it.
        """
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self.text += self._decode_new()
        if self.stop:
            cut = self._stop_position()
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped = True
                return self._flush()
            return self._release(len(self.text) - self._held_back())
        return self._flush()

    def finish(self) -> str:
        """The rest of the text when the row ends for any other reason (EOS, length)."""
        return self._flush()

    def _stop_position(self) -> int | None:
        longest = max(len(s) for s in self.stop)
        # A stop sequence can only start in the held-back tail or in what was just added.
        start = max(0, self.sent - longest + 1)
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop sequence."""
        best = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:k]):
                    best = k
                    break
        return best

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out = self.text[self.sent:upto]
        self.sent = upto
        return out

    def _flush(self) -> str:
        return self._release(len(self.text))
