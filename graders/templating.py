"""Template strings as OpenAI's graders take them: `{{item.answer}}`, `{{item.a.b}}`, `{{sample.output_text}}`,
`{{sample.output_json.field}}`, whitespace allowed inside the braces. A template is checked once
(`compile_template`: syntax, namespaces, size) and rendered per sample by plain lookups in the dataset item
and the sample: nothing inside the braces is ever evaluated.

Lookups walk objects by key and arrays by a decimal index (`{{item.choices.0}}`). A value that is not a
string renders as JSON (`3`, `true`, `{"a": 1}`). `output_json` is the sample parsed as JSON, only when the
whole sample is valid JSON (as OpenAI documents it)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graders.errors import (
    INVALID_TEMPLATE,
    INVALID_VARIABLE_ERROR,
    OTHER_ERROR,
    SAMPLE_PARSE_ERROR,
    GraderError,
    SampleError,
)
from graders.limits import (
    MAX_PLACEHOLDERS,
    MAX_RENDERED_CHARS,
    MAX_SEGMENT_CHARS,
    MAX_TEMPLATE_CHARS,
    MAX_VARIABLE_SEGMENTS,
)

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.S)
# The inside of the braces: a namespace, then dot-separated segments without whitespace, dots or braces.
_VARIABLE = re.compile(r"\s*([A-Za-z_]\w*)((?:\.[^\s.{}]+)*)\s*", re.A)
SAMPLE_FIELDS = ("output_text", "output_json")


@dataclass(frozen=True)
class Variable:
    """One `{{namespace.a.b}}`: `namespace` is item or sample, `path` the segments after it."""

    namespace: str
    path: tuple[str, ...]

    @property
    def dotted(self) -> str:
        return ".".join((self.namespace, *self.path))


@dataclass(frozen=True)
class Template:
    """A checked template: literal text and variables, in order."""

    parts: tuple[str | Variable, ...]

    @property
    def variables(self) -> tuple[Variable, ...]:
        return tuple(part for part in self.parts if isinstance(part, Variable))

    def render(self, namespaces: Namespaces) -> str:
        out: list[str] = []
        size = 0
        for part in self.parts:
            text = part if isinstance(part, str) else namespaces.lookup(part)
            size += len(text)
            if size > MAX_RENDERED_CHARS:
                raise SampleError(OTHER_ERROR, f"A rendered template would exceed {MAX_RENDERED_CHARS} characters.")
            out.append(text)
        return "".join(out)


def compile_template(text: Any, path: str) -> Template:
    """Check `text` (the field at `path`) and split it into literal text and variables."""
    if not isinstance(text, str):
        raise GraderError(f"'{path}' must be a string.", path, INVALID_TEMPLATE)
    if len(text) > MAX_TEMPLATE_CHARS:
        message = f"'{path}' is {len(text)} characters long; the limit is {MAX_TEMPLATE_CHARS}."
        raise GraderError(message, path, INVALID_TEMPLATE)
    parts: list[str | Variable] = []
    position = 0
    for count, match in enumerate(_PLACEHOLDER.finditer(text), start=1):
        if count > MAX_PLACEHOLDERS:
            raise GraderError(f"'{path}' has more than {MAX_PLACEHOLDERS} template variables.", path, INVALID_TEMPLATE)
        if match.start() > position:
            parts.append(text[position : match.start()])
        parts.append(_variable(match.group(1), path))
        position = match.end()
    rest = text[position:]
    if "{{" in rest:
        raise GraderError(f"'{path}' has a '{{{{' that is never closed with '}}}}'.", path, INVALID_TEMPLATE)
    if rest:
        parts.append(rest)
    return Template(tuple(parts))


def _variable(inside: str, path: str) -> Variable:
    shown = inside.strip()[:80]
    match = _VARIABLE.fullmatch(inside)
    if match is None:
        raise GraderError(
            f"'{path}': '{{{{{shown}}}}}' is not a template variable; use {{{{item.<field>}}}}, "
            "{{sample.output_text}} or {{sample.output_json.<field>}}.", path, INVALID_TEMPLATE,
        )
    namespace = match.group(1)
    segments = tuple(match.group(2).split(".")[1:])
    if namespace not in ("item", "sample"):
        raise GraderError(
            f"'{path}': unknown namespace '{namespace[:40]}' in '{{{{{shown}}}}}'; the namespaces are item and sample.",
            path, INVALID_TEMPLATE,
        )
    if len(segments) > MAX_VARIABLE_SEGMENTS or any(len(s) > MAX_SEGMENT_CHARS for s in segments):
        raise GraderError(f"'{path}': the variable '{{{{{shown}}}}}' is too long.", path, INVALID_TEMPLATE)
    if namespace == "sample":
        field = segments[0] if segments else None
        if field not in SAMPLE_FIELDS:
            raise GraderError(
                f"'{path}': '{{{{{shown}}}}}' names no field of the sample; "
                "use sample.output_text or sample.output_json.",
                path, INVALID_TEMPLATE,
            )
        if field == "output_text" and len(segments) > 1:
            raise GraderError(f"'{path}': sample.output_text is a string; it has no fields.", path, INVALID_TEMPLATE)
    return Variable(namespace, segments)


_NOT_JSON = object()


class Namespaces:
    """What templates of one sample look up: the dataset item and the sample (with its JSON, parsed once,
    only if a template asks for it)."""

    def __init__(self, sample: str, item: Any):
        self.sample = sample
        self.item = {} if item is None else item
        self._json: Any = None
        self._json_parsed = False

    def output_json(self) -> Any:
        if not self._json_parsed:
            self._json_parsed = True
            try:
                self._json = json.loads(self.sample)
            except (ValueError, RecursionError):
                self._json = _NOT_JSON
        if self._json is _NOT_JSON:
            raise SampleError(SAMPLE_PARSE_ERROR, "The sample is not valid JSON, so sample.output_json is not set.")
        return self._json

    def lookup(self, variable: Variable) -> str:
        if variable.namespace == "item":
            value, walked = self.item, ("item",)
            segments = variable.path
        elif variable.path[0] == "output_text":
            return self.sample
        else:
            value, walked = self.output_json(), ("sample", "output_json")
            segments = variable.path[1:]
        for segment in segments:
            value = _step(value, segment, ".".join(walked), variable)
            walked += (segment,)
        return value if isinstance(value, str) else _as_text(value)


def _step(value: Any, segment: str, where: str, variable: Variable) -> Any:
    if isinstance(value, Mapping) and segment in value:
        return value[segment]
    if isinstance(value, list) and segment.isascii() and segment.isdigit() and int(segment) < len(value):
        return value[int(segment)]
    raise SampleError(
        INVALID_VARIABLE_ERROR,
        f"Template variable '{variable.dotted}' is missing: {where} has no field '{segment}'.",
    )


def _as_text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)
