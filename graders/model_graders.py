"""The graders that ask a model: score_model (`{type, name, model, input, range?, sampling_params?}`, the
score the model answers, clamped to `range`, default [0, 1]) and label_model (`{type, name, model, input,
labels, passing_labels}`, 1.0 when the model's label is one of `passing_labels`).

`input` is OpenAI's list of messages (`{role, content, type?: "message"}`) whose text content may hold
templates; content is a string, an `input_text` / `output_text` part, or a list of those. Images and audio
are refused at validation (grader_not_supported): the service's graders call text models. The rendered
messages go to the caller's `complete` callable with plain-string content (a message's parts joined by
newlines) and `developer` sent as `system` (the role our chat templates know).

OpenAI forces the grader model's answer into a JSON schema; a `complete` callable cannot, so the answer is
parsed leniently: a JSON object (the whole answer, a fenced block, or an object inside the text) with a
numeric `result` (or `score`) for score_model and a string `result` (or `label`) for label_model; failing
that, the first number in the text, or the one label the text names. Anything else is
model_grader_parse_error."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from graders.errors import GRADER_NOT_SUPPORTED, MODEL_GRADER_PARSE_ERROR, GraderError, SampleError
from graders.fields import (
    check_enum,
    check_int,
    check_keys,
    check_list,
    check_name,
    check_number,
    check_object,
    check_str,
    child,
    index,
)
from graders.limits import (
    MAX_ANSWER_CHARS,
    MAX_COMPLETION_TOKENS,
    MAX_CONTENT_PARTS,
    MAX_INPUT_MESSAGES,
    MAX_JSON_STARTS,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_MODEL_CHARS,
)
from graders.templating import Namespaces, Template, compile_template

if TYPE_CHECKING:
    from graders.context import GradingRun

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text")
MEDIA_PARTS = ("input_image", "input_audio")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
DEFAULT_RANGE = (0.0, 1.0)
MODEL_GRADER_TYPES = ("score_model", "label_model")


@dataclass(frozen=True)
class Message:
    role: str
    parts: tuple[Template, ...]

    def render(self, namespaces: Namespaces) -> dict:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": "\n".join(part.render(namespaces) for part in self.parts)}


@dataclass(frozen=True)
class ScoreModel:
    type: ClassVar[str] = "score_model"
    name: str
    model: str
    input: tuple[Message, ...]
    range: tuple[float, float] = DEFAULT_RANGE
    sampling_params: Mapping[str, Any] | None = None

    def grade(self, run: GradingRun, path: str, key: str) -> float:
        messages = [message.render(run.namespaces) for message in self.input]
        answer = run.complete(self.model, messages, self.sampling_params or {})
        low, high = self.range
        return min(max(parse_score(_bounded(answer.text)), low), high)


@dataclass(frozen=True)
class LabelModel:
    type: ClassVar[str] = "label_model"
    name: str
    model: str
    input: tuple[Message, ...]
    labels: tuple[str, ...]
    passing_labels: frozenset[str]

    def grade(self, run: GradingRun, path: str, key: str) -> float:
        messages = [message.render(run.namespaces) for message in self.input]
        answer = run.complete(self.model, messages, {})
        return 1.0 if parse_label(_bounded(answer.text), self.labels) in self.passing_labels else 0.0


def _bounded(answer: str) -> str:
    if len(answer) > MAX_ANSWER_CHARS:
        raise SampleError(MODEL_GRADER_PARSE_ERROR, f"The grader model's answer is {len(answer)} characters long; "
                          f"answers past {MAX_ANSWER_CHARS} are not parsed.")
    return answer


# ---- validation -------------------------------------------------------------------------------------------


def compile_score_model(grader: Mapping, path: str) -> ScoreModel:
    check_keys(grader, path, ("type", "name", "model", "input"), ("range", "sampling_params"))
    return ScoreModel(
        name=check_name(grader, path),
        model=check_str(grader["model"], child(path, "model"), max_chars=MAX_MODEL_CHARS),
        input=compile_messages(grader["input"], child(path, "input")),
        range=_range(grader.get("range"), child(path, "range")),
        sampling_params=_sampling_params(grader.get("sampling_params"), child(path, "sampling_params")),
    )


def compile_label_model(grader: Mapping, path: str) -> LabelModel:
    check_keys(grader, path, ("type", "name", "model", "input", "labels", "passing_labels"))
    labels = _labels(grader["labels"], child(path, "labels"))
    passing_path = child(path, "passing_labels")
    passing = _labels(grader["passing_labels"], passing_path)
    for i, label in enumerate(passing):
        if label not in labels:
            at = index(passing_path, i)
            raise GraderError(f"'{at}' ('{label[:80]}') is not one of the labels.", at)
    return LabelModel(
        name=check_name(grader, path),
        model=check_str(grader["model"], child(path, "model"), max_chars=MAX_MODEL_CHARS),
        input=compile_messages(grader["input"], child(path, "input")),
        labels=tuple(labels),
        passing_labels=frozenset(passing),
    )


def compile_messages(value: Any, path: str) -> tuple[Message, ...]:
    messages = []
    for i, message in enumerate(check_list(value, path, max_items=MAX_INPUT_MESSAGES)):
        at = index(path, i)
        check_object(message, at)
        check_keys(message, at, ("role", "content"), ("type",))
        if "type" in message:
            check_enum(message["type"], child(at, "type"), ("message",))
        role = check_enum(message["role"], child(at, "role"), ROLES)
        messages.append(Message(role, _content(message["content"], child(at, "content"))))
    return tuple(messages)


def _content(value: Any, path: str) -> tuple[Template, ...]:
    if isinstance(value, list | tuple):
        parts = check_list(value, path, max_items=MAX_CONTENT_PARTS)
        return tuple(_part(part, index(path, i)) for i, part in enumerate(parts))
    return (_part(value, path),)


def _part(value: Any, path: str) -> Template:
    if isinstance(value, str):
        return compile_template(value, path)
    check_object(value, path)
    if "type" not in value:
        raise GraderError(f"Missing required field '{child(path, 'type')}'.", child(path, "type"))
    kind_path = child(path, "type")
    if value["type"] in MEDIA_PARTS:
        message = f"'{kind_path}' {value['type']} is not supported: model graders here take text only."
        raise GraderError(message, kind_path, GRADER_NOT_SUPPORTED)
    check_enum(value["type"], kind_path, TEXT_PARTS)
    check_keys(value, path, ("type", "text"))
    return compile_template(value["text"], child(path, "text"))


def _range(value: Any, path: str) -> tuple[float, float]:
    if value is None:
        return DEFAULT_RANGE
    items = check_list(value, path, max_items=2)
    if len(items) != 2:
        raise GraderError(f"'{path}' must be two numbers, [min, max].", path)
    low, high = (check_number(item, index(path, i)) for i, item in enumerate(items))
    if not low < high:
        raise GraderError(f"'{path}' must be [min, max] with min < max; got [{low:g}, {high:g}].", path)
    return (low, high)


def _sampling_params(value: Any, path: str) -> dict[str, Any] | None:
    if value is None:
        return None
    check_object(value, path)
    check_keys(value, path, (), ("max_completions_tokens", "reasoning_effort", "seed", "temperature", "top_p"))
    checks = {
        "max_completions_tokens": lambda v, p: check_int(v, p, low=1, high=MAX_COMPLETION_TOKENS),
        "reasoning_effort": lambda v, p: check_enum(v, p, REASONING_EFFORTS),
        "seed": lambda v, p: check_int(v, p, low=-(2**63), high=2**64 - 1),
        "temperature": lambda v, p: check_number(v, p, low=0, high=2),
        "top_p": lambda v, p: check_number(v, p, low=0, high=1, low_open=True),
    }
    # null means "not set", as in OpenAI's types; only the set keys reach `complete`.
    return {key: checks[key](v, child(path, key)) for key, v in value.items() if v is not None}


def _labels(value: Any, path: str) -> list[str]:
    labels = check_list(value, path, max_items=MAX_LABELS)
    seen = set()
    for i, label in enumerate(labels):
        check_str(label, index(path, i), max_chars=MAX_LABEL_CHARS)
        if label in seen:
            raise GraderError(f"'{index(path, i)}' repeats the label '{label[:80]}'.", index(path, i))
        seen.add(label)
    return labels


# ---- parsing the grader model's answer --------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)
_NO_JSON = object()


def _json_objects(text: str) -> list[Any]:
    """JSON values found in `text`: the whole text, fenced blocks, then objects starting at a `{` (the first
    MAX_JSON_STARTS of them)."""
    found: list[Any] = []
    candidates = [text.strip(), *(m.group(1).strip() for m in _FENCE.finditer(text))]
    for candidate in candidates:
        try:
            found.append(json.loads(candidate))
        except (ValueError, RecursionError):
            pass
    if found:
        return found
    decoder = json.JSONDecoder()
    start = text.find("{")
    tries = 0
    while start != -1 and tries < MAX_JSON_STARTS:
        tries += 1
        try:
            value, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            start = text.find("{", start + 1)
            continue
        found.append(value)
        start = text.find("{", end)
    return found


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    return None


def parse_score(text: str) -> float:
    """The score in a score_model answer (unclamped); SampleError(model_grader_parse_error) if none."""
    values = _json_objects(text)
    objects = [v for v in values if isinstance(v, dict)]
    for obj in objects:
        for key in ("result", "score"):
            if key in obj:
                number = _as_number(obj[key])
                if number is None:
                    shown = str(obj[key])[:80]
                    message = f"The grader model's '{key}' is not a finite number: {shown!r}."
                    raise SampleError(MODEL_GRADER_PARSE_ERROR, message)
                return number
    if objects:
        message = "The grader model answered JSON with no numeric 'result' or 'score'."
        raise SampleError(MODEL_GRADER_PARSE_ERROR, message)
    for value in values:
        number = _as_number(value)
        if number is not None:
            return number
    match = _NUMBER.search(text)
    number = _as_number(match.group()) if match else None
    if number is None:
        raise SampleError(MODEL_GRADER_PARSE_ERROR, f"No score in the grader model's answer: {text[:120]!r}.")
    return number


def parse_label(text: str, labels: tuple[str, ...]) -> str:
    """The label a label_model answer names; SampleError(model_grader_parse_error) if none or ambiguous."""
    by_folded = {label.casefold(): label for label in labels}

    def known(value: str) -> str | None:
        return value if value in labels else by_folded.get(value.strip().strip("\"'.`*").strip().casefold())

    for obj in _json_objects(text):
        if isinstance(obj, dict):
            for key in ("result", "label"):
                if isinstance(obj.get(key), str):
                    label = known(obj[key])
                    if label is None:
                        message = f"The grader model's label {obj[key][:80]!r} is not one of the labels."
                        raise SampleError(MODEL_GRADER_PARSE_ERROR, message)
                    return label
        elif isinstance(obj, str) and known(obj) is not None:
            return known(obj)
    label = known(text)
    if label is not None:
        return label
    folded = text.casefold()
    named = [
        label for label in labels
        if re.search(rf"(?<!\w){re.escape(label.casefold())}(?!\w)", folded)
    ]
    if len(named) == 1:
        return named[0]
    why = "names several labels" if named else "names none of the labels"
    raise SampleError(MODEL_GRADER_PARSE_ERROR, f"The grader model's answer {why}: {text[:120]!r}.")
