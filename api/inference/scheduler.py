"""Continuous batching on the engine thread: admit requests, prefill newcomers, decode every running row one
token per step, and retire rows as they finish, each lane (model copy) on its own batch.

One ``step()`` does, for every lane with work: drop cancelled rows; prefill waiting rows (up to the batch
limit) in one left-padded forward and merge their key/value cache into the running batch; then one decode
forward for all running rows. A row that finishes (EOS, stop sequence, max_tokens, client gone) leaves the
batch at once, so its slot is free for the next step. Requests never wait for a "wave" to end.

Everything here runs on the engine thread only; results leave through the tickets (``engine.py``).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from svfit_core.errors import SVFitError
from svfit_core.serialization import read_adapter_config

from api.core.errors import (
    ContextLengthExceeded,
    InternalError,
    InvalidParameter,
    ServiceError,
    WrongModelTask,
)
from api.core.basis_store import StoredBases
from api.core.settings import Settings
from api.core.storage import storage_for
from api.inference.kv import PaddedCache, left_pad
from api.inference.lanes import EncoderLane, Lane, LoraLane, ModelLane, SharedBaseLane
from api.inference.servable_models import (
    is_encoder,
    load_adapted_model,
    load_causal_base,
    load_encoder,
    load_full_model,
    resolve_device,
    resolve_dtype,
)
from api.inference.logprobs import prompt_logprobs, step_logprobs
from api.inference.model_cache import ModelCache
from api.inference.pooling import max_sequence_length, pool, pooling_mode
from api.inference.sampling import next_tokens, row_generator
from api.inference.text import TextTracker
from api.inference.types import (
    Admission,
    ChoiceFinished,
    ClassificationResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationDone,
    ModelRef,
    TextDelta,
)

logger = logging.getLogger(__name__)

LORA_METHODS = ("lora", "pissa")  # PiSSA adapters are published as plain LoRA adapters


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


def _token_ids(ids, vocab: int, param: str) -> list[int]:
    """Token ids a request sent itself, checked against the model's vocabulary."""
    ids = list(ids)
    if any(not 0 <= t < vocab for t in ids):
        raise InvalidParameter(f"Token ids in '{param}' must be in [0, {vocab}).", param=param)
    return ids


def _message_text(content: Any) -> str:
    """Chat content as text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


class Scheduler:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.inference_device)
        self.dtype = resolve_dtype(settings.inference_dtype, self.device)
        self.max_batch = settings.inference_max_batch
        self.cache = ModelCache(int(settings.inference_memory_budget_mb * 2**20))
        self.states: dict[tuple, LaneState] = {}
        # Compact SVFit adapters name their bases in the store; the trainer put them there.
        self.bases = StoredBases(storage_for(settings, check=False))

    # -- lanes -------------------------------------------------------------------------------------------

    def _kind(self, ref: ModelRef) -> str:
        if ref.task == "classification":
            return "model"
        if ref.method is None:
            return "shared"
        if ref.method == "svfit":
            # An adapter that trains a whole module (a head) cannot share the base copy with others.
            return "model" if read_adapter_config(ref.adapter_dir).get("modules_to_save") else "shared"
        if ref.method in LORA_METHODS:
            return "lora"
        return "model"

    def lane_key(self, ref: ModelRef, embedding: bool = False) -> tuple:
        """What makes the model copy serving ``ref`` (for embeddings, or else for its task) distinct:
        (kind, weights, dtype, device)."""
        kind = "encoder" if embedding else self._kind(ref)
        weights = str(ref.base_path if kind in ("shared", "lora") else ref.adapter_dir or ref.base_path)
        return (kind, weights, str(self.dtype), str(self.device))

    def loaded_lane(self, key: tuple) -> Lane | None:
        """The lane for ``key`` if it is in memory."""
        lane = self.cache.lookup(key)
        if lane is not None:
            self._track(key, lane)
        return lane

    def build_lane(self, ref: ModelRef, key: tuple) -> Lane:
        """Load the model copy for ``ref``, or raise the ServiceError a client should see. Reads only settings,
        so it may run on the loader thread while this thread decodes."""
        kind, weights = key[0], key[1]
        s = self.settings
        logger.info("loading %s model %s", kind, weights)
        try:
            if kind == "encoder":
                return self._encoder_lane(ref, key)
            if kind == "shared":
                model, tokenizer, hashes = load_causal_base(ref.base_path, self.dtype, self.device)
                return SharedBaseLane(key, model, tokenizer, max_adapters=s.inference_max_adapters,
                                      serving_rank=s.inference_serving_rank, base_hashes=hashes, bases=self.bases)
            if kind == "lora":
                model, tokenizer, _ = load_causal_base(ref.base_path, self.dtype, self.device)
                return LoraLane(key, model, tokenizer, max_adapters=s.inference_max_adapters)
            if ref.task == "causal" and ref.method == "full":
                return ModelLane(key, *load_full_model(ref, self.dtype, self.device))
            if ref.adapter_dir is None:
                raise WrongModelTask(f"The model '{ref.model_id}' is not a classification model.", param="model")
            model, tokenizer = load_adapted_model(ref, self.dtype, self.device, self.bases)
            return ModelLane(key, model, tokenizer, task=ref.task)
        except ServiceError:
            raise
        except ValueError as exc:  # transformers' answer to "this folder is not that kind of model"
            logger.warning("cannot load %s as a %s model: %s", ref.model_id, ref.task, exc)
            what = "text generation" if ref.task == "causal" else "classification"
            raise WrongModelTask(f"The model '{ref.model_id}' cannot be served as a {what} model.",
                                 param="model") from exc
        except Exception as exc:
            logger.exception("loading %s failed", ref.model_id)
            raise InternalError(f"The model '{ref.model_id}' could not be loaded.", code="model_load_failed") from exc

    def _encoder_lane(self, ref: ModelRef, key: tuple) -> EncoderLane:
        generator = ref.task == "causal" if ref.adapter_dir is not None else not is_encoder(ref.base_path)
        if generator:
            raise WrongModelTask(
                f"The model '{ref.model_id}' generates text; embeddings come from encoder models and their "
                "classification fine-tunes.", param="model")
        model, tokenizer = load_encoder(ref, self.dtype, self.device, self.bases)
        return EncoderLane(key, model, tokenizer, pooling_mode(ref.base_path), max_sequence_length(ref.base_path))

    def install(self, key: tuple, lane: Lane) -> Lane:
        """Keep a lane ``build_lane`` loaded (idle lanes may be dropped to make room)."""
        self.cache.add(key, lane)
        self._track(key, lane)
        return lane

    def lane_for(self, ref: ModelRef, embedding: bool = False) -> Lane:
        """The lane serving ``ref``, loaded here and now if it is not in memory."""
        key = self.lane_key(ref, embedding)
        return self.loaded_lane(key) or self.install(key, self.build_lane(ref, key))

    def _track(self, key: tuple, lane: Lane) -> None:
        state = self.states.get(key)
        if state is None or state.lane is not lane:  # new, or reloaded after an eviction
            self.states[key] = LaneState(lane)

    def _tag(self, lane: Lane, ref: ModelRef) -> Any:
        try:
            return lane.tag_for(ref)
        except (SVFitError, OSError, ValueError) as exc:
            logger.exception("registering adapter %s failed", ref.adapter_dir)
            code = exc.code if isinstance(exc, SVFitError) else "model_load_failed"
            raise InternalError(f"The fine-tuned model '{ref.model_id}' could not be loaded: {exc}", code=code) from exc

    # -- admission ---------------------------------------------------------------------------------------

    def _encode(self, lane: Lane, request) -> tuple[list[list[int]], str]:
        """Token ids of each prompt, and the request field they came from (for error messages)."""
        tokenizer = lane.tokenizer
        if request.messages is not None:
            messages = [{**m, "content": _message_text(m.get("content"))} for m in request.messages]
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja templates raise their own errors ("roles must alternate")
                raise InvalidParameter(f"The chat template cannot render these messages: {exc}",
                                       param="messages") from exc
            # The template writes the special tokens itself, as training renders it (svfit_core.training.encoding).
            return [tokenizer(text, add_special_tokens=False)["input_ids"]], "messages"
        prompts = []
        vocab = lane.vocab_size
        for prompt in request.prompts:
            if isinstance(prompt, str):
                ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            else:
                ids = _token_ids(prompt, vocab, "prompt")
            if not ids:
                raise InvalidParameter("A prompt must hold at least one token.", param="prompt")
            prompts.append(ids)
        return prompts, "prompt"

    def admit(self, ticket, lane: Lane | None = None) -> None:
        """Turn a generation ticket into rows waiting on their lane, or fail it (before any event)."""
        request = ticket.request
        lane = lane or self.lane_for(request.ref)
        if lane.task != "causal":
            raise WrongModelTask(
                f"The model '{request.ref.model_id}' is a classification model; use /v1/classifications.", param="model"
            )
        prompts, field_name = self._encode(lane, request)
        sampling = request.sampling
        vocab = lane.vocab_size
        if any(token >= vocab for token, _ in sampling.logit_bias):
            raise InvalidParameter(f"Token ids in 'logit_bias' must be in [0, {vocab}).", param="logit_bias")
        limits = []
        for ids in prompts:
            room = lane.context_length - len(ids)
            wanted = sampling.max_tokens
            if wanted is None:
                wanted = room if request.default_max_tokens is None else min(request.default_max_tokens, room)
            if (room < 1 and wanted > 0) or len(ids) + wanted > lane.context_length:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {lane.context_length} tokens. However, you requested "
                    f"{len(ids) + max(wanted, 1)} tokens ({len(ids)} in the {field_name}, {max(wanted, 1)} in the "
                    f"completion). Please reduce the length of the {field_name} or the completion.",
                    # A completion that could never fit, whatever the prompt, is max_tokens' fault alone.
                    param=sampling.max_tokens_param if sampling.max_tokens is not None and wanted >= lane.context_length
                    else field_name,
                )
            limits.append(wanted)
            if sampling.echo and sampling.logprobs is not None:
                self._check_scoring_size(lane, len(ids))
        tag = self._tag(lane, request.ref)
        state = self.states[lane.key]
        rows = []
        for p, (ids, max_tokens) in enumerate(zip(prompts, limits)):
            echo = None
            if sampling.echo:
                prompt = request.prompts[p]
                echo = prompt if isinstance(prompt, str) else lane.tokenizer.decode(ids)
            for j in range(sampling.n):
                rows.append(Row(
                    ticket=ticket,
                    index=p * sampling.n + j,
                    prompt=ids,
                    tag=tag,
                    tracker=TextTracker(lane.tokenizer, sampling.stop),
                    generator=row_generator(sampling.seed, p, j, lane.device),
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    presence_penalty=sampling.presence_penalty,
                    frequency_penalty=sampling.frequency_penalty,
                    max_tokens=max_tokens,
                    ignore_eos=sampling.ignore_eos,
                    logprobs=sampling.logprobs,
                    logit_bias=sampling.logit_bias,
                    echo=echo,
                ))
        prompt_tokens = sum(len(ids) for ids in prompts)
        ticket.rows_left = len(rows)
        ticket.prompt_tokens = prompt_tokens
        for row in rows:
            lane.hold(row.tag)  # from now on the adapter may not be dropped
        state.waiting.extend(rows)
        ticket.admit(Admission(prompt_tokens=prompt_tokens, choices=len(rows), max_tokens=max(limits)))

    def _check_scoring_size(self, lane: Lane, prompt_tokens: int) -> None:
        """Scoring a prompt holds its logits at every position (and their log-softmax, in float32): refuse a
        prompt whose tensors would pass ``inference_max_scoring_mb`` instead of exhausting memory."""
        width = getattr(lane.model.config, "vocab_size", None) or lane.vocab_size  # the logits' last dimension
        mb = prompt_tokens * width * (torch.finfo(self.dtype).bits // 8 + 4) / 2**20
        if mb > self.settings.inference_max_scoring_mb:
            raise InvalidParameter(
                f"Scoring this prompt with 'echo' and 'logprobs' would need {mb:.0f} MB of logits; the limit is "
                f"{self.settings.inference_max_scoring_mb:.0f} MB. Send a shorter prompt.",
                param="prompt",
            )

    # -- classification ----------------------------------------------------------------------------------

    def classify(self, request, lane: Lane | None = None) -> ClassificationResult:
        lane = lane or self.lane_for(request.ref)
        if lane.task != "classification":
            raise WrongModelTask(
                f"The model '{request.ref.model_id}' is not a classification model.", param="model"
            )
        model, tokenizer = lane.model, lane.tokenizer
        config = model.config
        labels = list(request.ref.label_names or [config.id2label[i] for i in range(config.num_labels)])
        token_types = bool(getattr(config, "type_vocab_size", 0))  # as training encodes (svfit_core.training)
        result = ClassificationResult(labels=labels)
        inputs = list(request.inputs)
        for start in range(0, len(inputs), self.max_batch):
            chunk = inputs[start:start + self.max_batch]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=lane.context_length,
                            return_token_type_ids=token_types, return_tensors="pt")
            result.prompt_tokens += int(enc["attention_mask"].sum())
            logits = model(**{k: v.to(lane.device) for k, v in enc.items()}).logits
            result.probabilities.extend(torch.softmax(logits.float(), dim=-1).tolist())
        return result

    def embed(self, request: EmbeddingRequest, lane: Lane | None = None) -> EmbeddingResult:
        lane = lane or self.lane_for(request.ref, embedding=True)
        tokenizer = lane.tokenizer
        token_types = bool(getattr(lane.model.config, "type_vocab_size", 0))
        texts = [item for item in request.inputs if isinstance(item, str)]
        encoded = iter(tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else [])  # one call for all
        rows = []
        for item in request.inputs:
            ids = next(encoded) if isinstance(item, str) else _token_ids(item, lane.vocab_size, "input")
            if len(ids) > lane.context_length:
                raise InvalidParameter(
                    f"This model's maximum context length is {lane.context_length} tokens; an input has "
                    f"{len(ids)}. Shorten it or split it.", param="input")
            rows.append(ids)
        result = EmbeddingResult(prompt_tokens=sum(len(ids) for ids in rows))
        for start in range(0, len(rows), self.max_batch):
            chunk = rows[start:start + self.max_batch]
            batch = tokenizer.pad({"input_ids": chunk}, return_tensors="pt")
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            if token_types:
                inputs["token_type_ids"] = torch.zeros_like(batch["input_ids"])
            inputs = {k: v.to(lane.device) for k, v in inputs.items()}
            states = lane.model(**inputs).last_hidden_state
            result.vectors.extend(pool(states, inputs["attention_mask"], lane.pooling).tolist())
        return result

    # -- the decode loop ---------------------------------------------------------------------------------

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

