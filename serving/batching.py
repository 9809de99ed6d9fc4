"""Continuous batching: the rows being generated on each lane, and the step that prefills newcomers, decodes
every running row one token and retires finished rows at once, so a freed slot is taken at the next step
rather than when a "wave" ends. Runs on the engine thread only; results leave through the tickets."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from api.core.errors import InternalError, ServiceError
from svfit_core.kv_cache import PaddedCache, left_pad
from serving.lanes import Lane
from serving.logprobs import prompt_logprobs, step_logprobs
from serving.model_cache import ModelCache
from svfit_core.sampling import next_tokens
from serving.text import TextTracker
from serving.types import ChoiceFinished, GenerationDone, TextDelta

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    """One choice being generated: a prompt, the tokens so far, how to sample and when to stop."""

    ticket: Any  # engine.GenerationTicket
    index: int
    prompt: list[int]
    tag: Any
    tracker: TextTracker
    generator: torch.Generator
    temperature: float
    top_p: float
    presence_penalty: float
    frequency_penalty: float
    max_tokens: int
    ignore_eos: bool
    logprobs: int | None = None  # how many alternatives to report per token; None: no log probabilities
    logit_bias: tuple[tuple[int, float], ...] = ()
    echo: str | None = None  # the prompt's text, when the answer starts with it (completions' echo)
    constraint: Any = None  # a grammar the answer follows (serving/structured.GrammarConstraint), None: free
    generated: list[int] = field(default_factory=list)
    position: int = 0  # position id of the next token fed to the model
    finished: bool = False


@dataclass(eq=False)
class LaneState:
    lane: Lane
    waiting: deque = field(default_factory=deque)
    joining: list[Row] = field(default_factory=list)  # being prefilled this step
    running: list[Row] = field(default_factory=list)
    cache: PaddedCache | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def rows(self) -> list[Row]:
        return [*self.waiting, *self.joining, *self.running]


class Batcher:
    """The decode loop, mixed into ``scheduler.Scheduler``. One ``step()`` does, for every lane with work: drop
    cancelled rows; prefill waiting rows (up to the batch limit) in one left-padded forward and merge their
    key/value cache into the running batch; then one decode forward for all running rows."""

    # Set by Scheduler.__init__; ``states`` gains a LaneState per lane as the lane manager tracks lanes.
    max_batch: int
    cache: ModelCache
    states: dict[tuple, LaneState]

    @property
    def has_work(self) -> bool:
        return any(state.has_work for state in self.states.values())

    def snapshot(self) -> dict:
        """Counts for monitoring and tests (read from other threads; plain ints and lists)."""
        return {
            "decoding": sum(len(s.running) for s in self.states.values()),
            "waiting": sum(len(s.waiting) for s in self.states.values()),
            "lanes": [list(key[:2]) for key in self.cache.lanes],
            "loaded_bytes": self.cache.total_bytes,
        }

    def step(self) -> None:
        for state in list(self.states.values()):
            if not state.has_work:
                continue
            try:
                self._step_lane(state)
            except Exception:  # noqa: BLE001 - one broken batch must not stop the engine
                logger.exception("inference step failed on %s", state.lane.key)
                self._fail_lane(state, InternalError("The server had an error while generating."))
        self.cache.evict()
        for key in [k for k, st in self.states.items() if k not in self.cache.lanes and not st.has_work]:
            del self.states[key]  # its lane was dropped from memory

    def _step_lane(self, state: LaneState) -> None:
        self._drop_cancelled(state)
        room = self.max_batch - len(state.running)
        if room > 0 and state.waiting:
            state.joining = [state.waiting.popleft() for _ in range(min(room, len(state.waiting)))]
            self._prefill(state, state.joining)
            state.joining = []
        if state.running:
            self._decode(state)

    def _forward(self, lane: Lane, rows: list[Row], every_position: bool = False, **inputs: Any) -> torch.Tensor:
        """Next-token logits (rows, vocab), computed for the last position only; with ``every_position``,
        (rows, positions, vocab)."""
        if every_position:
            return lane.forward([r.tag for r in rows], use_cache=True, **inputs)
        if lane.keeps_last_logits:
            inputs["logits_to_keep"] = 1
        return lane.forward([r.tag for r in rows], use_cache=True, **inputs)[:, -1]

    def _prefill(self, state: LaneState, rows: list[Row]) -> None:
        # An echoed prompt with log probabilities needs the model's output at every prompt position: a
        # (positions × vocabulary) tensor per row, so such rows go through one at a time to bound it.
        scoring = [r for r in rows if r.echo is not None and r.logprobs is not None]
        for row in scoring:
            self._prefill_batch(state, [row], every_position=True)
        rest = [r for r in rows if not (r.echo is not None and r.logprobs is not None)]
        if rest:
            self._prefill_batch(state, rest, every_position=False)

    def _prefill_batch(self, state: LaneState, rows: list[Row], every_position: bool) -> None:
        lane = state.lane
        ids, mask, positions = left_pad([r.prompt for r in rows], lane.pad_id, lane.device)
        cache = PaddedCache(DynamicCache(), mask)
        logits = self._forward(lane, rows, every_position, input_ids=ids, attention_mask=mask,
                               position_ids=positions, **{lane.cache_argument: cache.cache})
        for i, row in enumerate(rows):
            row.position = len(row.prompt)
            if row.echo is not None:
                self._echo(lane, row, logits[i, -len(row.prompt):] if every_position else None)
        if every_position:
            logits = logits[:, -1]
        generating = [i for i, row in enumerate(rows) if not row.finished]
        if len(generating) < len(rows):
            rows, logits = [rows[i] for i in generating], logits[generating]
            if not rows:
                return
            cache.select(generating)
        self._accept(lane, rows, logits)
        keep = [i for i, row in enumerate(rows) if not row.finished]
        if len(keep) < len(rows):
            if not keep:
                return
            cache.select(keep)
        if state.cache is None:
            state.cache = cache
        else:
            state.cache.merge(cache)
        state.running.extend(rows[i] for i in keep)

    def _echo(self, lane: Lane, row: Row, prompt_logits: torch.Tensor | None) -> None:
        """The prompt as the answer's first text (with its tokens' log probabilities when asked for); a row
        asked for no new tokens ends here."""
        logprobs = () if prompt_logits is None else prompt_logprobs(prompt_logits, row.prompt, row.logprobs,
                                                                     lane.token_names)
        events: list = [TextDelta(row.index, row.echo, logprobs)]
        if row.max_tokens == 0:
            events.extend(self._finish(lane, row, "length"))
        row.ticket.post(events)

    def _decode(self, state: LaneState) -> None:
        lane, rows = state.lane, state.running
        tokens = torch.tensor([[r.generated[-1]] for r in rows], dtype=torch.long, device=lane.device)
        positions = torch.tensor([[r.position] for r in rows], dtype=torch.long, device=lane.device)
        mask = state.cache.extend_mask()
        logits = self._forward(lane, rows, input_ids=tokens, attention_mask=mask, position_ids=positions,
                               **{lane.cache_argument: state.cache.cache})
        for row in rows:
            row.position += 1
        self._accept(lane, rows, logits)
        self._retire(state)

    def _accept(self, lane: Lane, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample one token per row, turn it into text and events, mark finished rows."""
        tokens = next_tokens(logits, rows)
        logprobs = step_logprobs(logits, tokens, [r.logprobs for r in rows], lane.token_names)
        events: dict[Any, list] = {}
        for row, token, token_logprob in zip(rows, tokens, logprobs):
            row.generated.append(token)
            if row.constraint is not None:
                row.constraint.advance(token)
            finish = None
            if token in lane.eos_ids and not row.ignore_eos:
                # The end-of-sequence token is not part of the answer: no text, and no log probability.
                text, finish, token_logprob = row.tracker.finish(), "stop", None
            else:
                text = row.tracker.add(token)
                if row.tracker.stopped:
                    finish = "stop"
                elif len(row.generated) >= row.max_tokens:
                    text += row.tracker.finish()
                    finish = "length"
            out = events.setdefault(row.ticket, [])
            if text or token_logprob is not None:
                out.append(TextDelta(row.index, text, () if token_logprob is None else (token_logprob,)))
            if finish is not None:
                out.extend(self._finish(lane, row, finish))
        for ticket, batch in events.items():
            if batch:
                ticket.post(batch)

    def _finish(self, lane: Lane, row: Row, reason: str) -> list:
        row.finished = True
        lane.release(row.tag)
        ticket = row.ticket
        ticket.rows_left -= 1
        ticket.completion_tokens += len(row.generated)
        events: list = [ChoiceFinished(row.index, reason, len(row.generated))]
        if ticket.rows_left == 0:
            events.append(GenerationDone(ticket.prompt_tokens, ticket.completion_tokens))
        return events

    def _retire(self, state: LaneState) -> None:
        keep = [i for i, row in enumerate(state.running) if not row.finished]
        if len(keep) == len(state.running):
            return
        if keep:
            state.cache.select(keep)
            state.running = [state.running[i] for i in keep]
        else:
            state.cache, state.running = None, []

    def _drop_cancelled(self, state: LaneState) -> None:
        """Rows whose client went away stop now: no more events, their slots free for this very step."""
        if any(row.ticket.cancelled for row in state.waiting):
            for row in [r for r in state.waiting if r.ticket.cancelled]:
                row.finished = True
                state.lane.release(row.tag)
            state.waiting = deque(r for r in state.waiting if not r.finished)
        for row in state.running:
            if row.ticket.cancelled and not row.finished:
                row.finished = True
                state.lane.release(row.tag)
        self._retire(state)

    def _fail_lane(self, state: LaneState, error: ServiceError) -> None:
        """Every unfinished row of the lane ends with ``error``; the lane starts over with an empty batch."""
        rows = list(dict.fromkeys(row for row in state.rows() if not row.finished))  # a row may be in two lists
        for row in rows:
            row.finished = True
            state.lane.release(row.tag)
        state.waiting, state.joining, state.running, state.cache = deque(), [], [], None
        for ticket in {row.ticket for row in rows}:
            ticket.post([error])

    def fail_all(self, error: ServiceError) -> None:
        for state in self.states.values():
            self._fail_lane(state, error)
