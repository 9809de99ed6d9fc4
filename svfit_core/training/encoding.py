"""Turning validated examples into token ids and training targets, one format at a time.

Causal examples become ``input_ids`` plus ``labels`` of the same length in the Hugging Face convention
(``labels[i] = input_ids[i]`` where the token is trained, -100 elsewhere; the loss shifts them). Chat
examples train only assistant turns with a non-zero weight, completion examples only the completion.
Classification examples become ``input_ids`` (and ``token_type_ids`` where the tokenizer makes them) and an
integer ``label``. Preference examples become a pair of causal rows, the context followed by the preferred
and by the non-preferred answer, each trained on its answer only. A prompt (reinforcement) becomes the
rendered conversation up to the assistant's turn, which the model then samples. Every sequence is cut to
``max_length``; the result says whether it was cut.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from svfit_core.errors import DataError
from svfit_core.tool_calls import default_messages, render_chat, template_takes_tools, tools_of
from svfit_core.training.data import Format
from svfit_core.training.tool_data import makes_calls

IGNORE_INDEX = -100  # the target value cross_entropy skips


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int] | int  # per-token targets (causal) or one class index (classification)
    token_type_ids: list[int] | None = None
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodedPreference:
    """One preference example: two causal rows sharing their context. Its length is the longer row's, the
    width the pair pads to."""

    chosen: Encoded
    rejected: Encoded

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


@dataclass
class EncodedPrompt:
    """One reinforcement prompt: the tokens the model answers from, and the line itself (graders read its
    fields as ``item``). Its length is the prompt's; the answer's room is counted apart."""

    input_ids: list[int]
    item: dict
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_example(
    example: dict, fmt: Format, tokenizer: PreTrainedTokenizerBase, max_length: int, *, token_types: bool = False
) -> Encoded | EncodedPreference | EncodedPrompt:
    """``token_types``: keep the tokenizer's ``token_type_ids`` (only models with segment embeddings,
    BERT-style, take them; a Llama forward would reject them)."""
    if fmt == "chat":
        return encode_chat(example["messages"], tokenizer, max_length, tools=tools_of(example))
    if fmt == "completion":
        return encode_completion(example["prompt"], example["completion"], tokenizer, max_length)
    if fmt == "preference":
        return encode_preference(example, tokenizer, max_length)
    if fmt == "prompt":
        return encode_prompt(example, tokenizer, max_length)
    return encode_classification(
        example["text"], example.get("text_pair"), example["label"], tokenizer, max_length, token_types=token_types
    )


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False,
            tools: list[dict] | None = None) -> str:
    return render_chat(tokenizer, messages, tools, generation_prompt=generation_prompt)


def chat_segments(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None = None
) -> list[tuple[str, bool]]:
    """Split a rendered chat into consecutive ``(text, trained)`` pieces that join to the full rendering.

    An assistant turn's piece runs from the end of the rendering of the chat before it (with the
    generation prompt) to the end of the rendering that includes it, so it holds exactly what the model
    must produce at that point: the answer (its tool calls included) and the template's end-of-turn marker.
    Tools, calls and results are rendered as serving renders them (``svfit_core.tool_calls``).
    """
    native = template_takes_tools(tokenizer) and bool(tools or any(makes_calls(m) for m in messages))
    if not native:  # the default rendering: tools, calls and results become plain text turns
        messages, tools = default_messages(messages, tools), None
    # Templates need no 'weight'.
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    full = _render(tokenizer, plain, tools=tools)
    segments: list[tuple[str, bool]] = []
    cursor = 0  # characters of `full` already assigned to a segment
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = _assistant_span(tokenizer, plain, i, full, cursor, tools)
        segments.append((full[cursor:start], False))
        segments.append((full[start:end], message.get("weight", 1) != 0))
        cursor = end
    segments.append((full[cursor:], False))
    return [(text, trained) for text, trained in segments if text]


def _assistant_span(
    tokenizer, plain: list[dict], i: int, full: str, cursor: int, tools: list[dict] | None = None
) -> tuple[int, int]:
    before = _render(tokenizer, plain[:i], generation_prompt=True, tools=tools) if i else None
    through = _render(tokenizer, plain[: i + 1], tools=tools)
    if before is not None and full.startswith(through) and through.startswith(before) and len(before) >= cursor:
        return len(before), len(through)
    # Some templates render a prefix differently (a default system prompt added only when the chat opens
    # with a user turn, say). Then the answer starts where its text does; it ends where the rendering
    # through this turn ends when that is a prefix, else after the text and an EOS right behind it.
    content = plain[i].get("content") or ""
    if not content:
        raise DataError(f"the chat template renders assistant message {i} (tool calls only) in a way that cannot "
                        "be masked")
    if full.startswith(through):
        start = through.rfind(content, cursor)
        if start >= 0:
            return start, len(through)
    start = full.find(content, cursor)
    if start < 0:
        raise DataError(f"the chat template does not render assistant message {i} verbatim; cannot mask it")
    end = start + len(content)
    eos = tokenizer.eos_token
    gap = len(full[end:]) - len(full[end:].lstrip())
    if eos and full.startswith(eos, end + gap):
        end += gap + len(eos)
    return start, end


def encode_chat(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, *, by_offsets: bool | None = None,
    tools: list[dict] | None = None,
) -> Encoded:
    """Tokens of the rendered chat; only the pieces ``chat_segments`` marks as trained get labels.

    Fast tokenizers tokenise the whole text once (as inference does) and label a token by where its first
    character falls. Others tokenise piece by piece: exact by construction, but a SentencePiece tokenizer
    would add its word-start marker at every piece border, hence the preference for offsets.
    """
    segments = chat_segments(messages, tokenizer, tools)
    if by_offsets is None:
        by_offsets = bool(getattr(tokenizer, "is_fast", False))
    input_ids: list[int] = []
    labels: list[int] = []
    if by_offsets:
        trained_spans, position = [], 0
        for text, trained in segments:
            if trained:
                trained_spans.append((position, position + len(text)))
            position += len(text)
        encoding = tokenizer("".join(text for text, _ in segments), add_special_tokens=False,
                             return_offsets_mapping=True)
        input_ids = list(encoding["input_ids"])
        for token, (start, _) in zip(input_ids, encoding["offset_mapping"], strict=True):
            trained = any(lo <= start < hi for lo, hi in trained_spans)
            labels.append(token if trained else IGNORE_INDEX)
    else:
        for text, trained in segments:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids.extend(ids)
            labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    return _truncate_causal(input_ids, labels, max_length)


def encode_preference(example: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> EncodedPreference:
    """The context (assistant turns in it are never trained) followed by each answer, rendered and masked as
    a chat whose only trained turn is that answer: the tokens DPO scores are the ones the model would say."""
    context = [{"role": m["role"], "content": m["content"], **({"weight": 0} if m["role"] == "assistant" else {})}
               for m in example["input"]["messages"]]

    def answered(key: str) -> Encoded:
        answer = example[key][0]
        return encode_chat([*context, {"role": "assistant", "content": answer["content"]}], tokenizer, max_length)

    return EncodedPreference(answered("preferred_output"), answered("non_preferred_output"))


def encode_prompt(example: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> EncodedPrompt:
    """The conversation rendered with the generation prompt, as the serving engine renders a chat request. A
    prompt over ``max_length`` keeps its last tokens: the turn being answered is at the end."""
    plain = [{"role": m["role"], "content": m["content"]} for m in example["messages"]]
    ids = tokenizer(_render(tokenizer, plain, generation_prompt=True), add_special_tokens=False)["input_ids"]
    truncated = len(ids) > max_length
    return EncodedPrompt(list(ids[-max_length:]), example, truncated=truncated)


def encode_completion(prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    # The prompt takes the tokenizer's usual specials (a BOS for Llama-style models); the completion ends
    # with EOS so the model learns where to stop.
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return _truncate_causal(input_ids, labels, max_length)


def _truncate_causal(input_ids: list[int], labels: list[int], max_length: int) -> Encoded:
    truncated = len(input_ids) > max_length
    return Encoded(input_ids[:max_length], labels[:max_length], truncated=truncated)


def encode_classification(
    text: str,
    text_pair: str | None,
    label: int,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    token_types: bool = False,
) -> Encoded:
    kwargs = {"return_token_type_ids": token_types}
    full = tokenizer(text, text_pair, **kwargs)
    truncated = len(full["input_ids"]) > max_length
    if truncated:
        full = tokenizer(text, text_pair, truncation=True, max_length=max_length, **kwargs)
    type_ids = full["token_type_ids"] if token_types else None
    return Encoded(full["input_ids"], int(label), token_type_ids=type_ids, truncated=truncated)


def count_targets(encoded: Encoded | EncodedPreference | EncodedPrompt) -> int:
    """How many predictions an example contributes to the loss (after the causal shift); a preference pair
    is one comparison, a prompt one group of sampled answers."""
    if isinstance(encoded, (EncodedPreference, EncodedPrompt)) or isinstance(encoded.labels, int):
        return 1
    # labels[0] is never predicted: nothing precedes it.
    return sum(1 for t in encoded.labels[1:] if t != IGNORE_INDEX)
