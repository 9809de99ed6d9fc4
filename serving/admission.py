"""Request admission: tokenising prompts (and chat messages through the model's template), checking token
ids, context length and scoring size, and turning a generation into rows waiting on their lane. Classification
and embedding requests, answered in one pass without the decode loop, are served here too."""

from __future__ import annotations

from typing import Any

import torch

from api.core.errors import ContextLengthExceeded, InvalidParameter, WrongModelTask
from api.core.settings import Settings
from serving.batching import LaneState, Row
from serving.lane_manager import not_generative
from serving.lanes import Lane
from serving.pooling import pool
from svfit_core.sampling import row_generator
from svfit_core.tool_calls import render_chat
from serving.structured import GrammarConstraint
from serving.text import TextTracker
from serving.types import Admission, ClassificationResult, EmbeddingRequest, EmbeddingResult
from svfit_core.training.collate import collate
from svfit_core.training.encoding import encode_classification


def _token_ids(ids, vocab: int, param: str) -> list[int]:
    """Token ids a request sent itself, checked against the model's vocabulary."""
    ids = list(ids)
    if any(not 0 <= t < vocab for t in ids):
        raise InvalidParameter(f"Token ids in '{param}' must be in [0, {vocab}).", param=param)
    return ids


class Admitter:
    """Admission, mixed into ``scheduler.Scheduler``: it finds a request's lane through the lane manager
    (``lane_for``, ``_tag``) and hands admitted rows to the decode loop through ``states``."""

    # Set by Scheduler.__init__.
    settings: Settings
    dtype: Any  # torch.dtype
    max_batch: int
    states: dict[tuple, LaneState]

    def _encode(self, lane: Lane, request) -> tuple[list[list[int]], str]:
        """Token ids of each prompt, and the request field they came from (for error messages)."""
        tokenizer = lane.tokenizer
        if request.messages is not None:
            use = request.tool_use
            try:
                # Tools, calls and results rendered as training renders them (svfit_core.tool_calls).
                text = render_chat(tokenizer, list(request.messages), list(use.tools) if use and use.tools else None,
                                   generation_prompt=True)
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
            raise not_generative(request.ref.model_id, "a classification model")
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
                    constraint=GrammarConstraint(lane.grammar_tokenizer(), request.grammar, lane.eos_ids,
                                                 request.grammar_param) if request.grammar else None,
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
        # Each text or pair goes through training's own encoder and padding, so a pair is served the logits the
        # trained model gives that pair as a training row. The label 0 is a placeholder the encoder asks for.
        pairs = request.text_pairs or (None,) * len(request.inputs)
        rows = [encode_classification(text, pair, 0, tokenizer, lane.context_length, token_types=token_types)
                for text, pair in zip(request.inputs, pairs, strict=True)]
        result = ClassificationResult(labels=labels, prompt_tokens=sum(len(row) for row in rows))
        for start in range(0, len(rows), self.max_batch):
            batch = collate(rows[start:start + self.max_batch], tokenizer.pad_token_id)
            del batch["labels"]  # the placeholders: given labels, the model would compute a loss too
            logits = model(**{k: v.to(lane.device) for k, v in batch.items()}).logits
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
