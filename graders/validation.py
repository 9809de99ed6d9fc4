"""Checking a grader object as OpenAI's API takes it, and compiling it into the form that runs: the `type`
picks the family, each family checks its own fields, and this module bounds the tree as a whole (multi
nesting depth, number of graders). Every refusal is a GraderError naming the full path of the field.

python graders are always refused (grader_not_supported): running user code needs a sandbox this service
does not have."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from graders.context import GraderNode
from graders.errors import GRADER_NOT_SUPPORTED, GRADER_TOO_LARGE, GraderError
from graders.fields import check_object, child, type_name
from graders.limits import MAX_GRADERS, MAX_MULTI_NESTING
from graders.model_graders import compile_label_model, compile_score_model
from graders.multi import compile_multi
from graders.string_check import compile_string_check
from graders.text_similarity import compile_text_similarity

_LEAVES: dict[str, Callable[[Mapping, str], GraderNode]] = {
    "string_check": compile_string_check,
    "text_similarity": compile_text_similarity,
    "score_model": compile_score_model,
    "label_model": compile_label_model,
}
REFUSED_TYPES = {
    "python": "python graders are not supported: running user code needs a sandbox this service does not have. "
    "Use string_check, text_similarity, score_model, label_model or multi.",
}
GRADER_TYPES = (*_LEAVES, "multi", *REFUSED_TYPES)


def validate_grader(grader: Any, path: str = "grader") -> None:
    """Raise GraderError if `grader` cannot be run; return None if it can."""
    compile_node(grader, path)


def compile_node(grader: Any, path: str = "grader") -> GraderNode:
    """Check `grader` (the field at `path`) and return its compiled tree."""
    return _Compiler().compile(grader, path, nesting=0)


class _Compiler:
    def __init__(self) -> None:
        self.graders = 0

    def compile(self, grader: Any, path: str, nesting: int) -> GraderNode:
        check_object(grader, path)
        self.graders += 1
        if self.graders > MAX_GRADERS:
            raise GraderError(f"The grader holds more than {MAX_GRADERS} graders in all.", path, GRADER_TOO_LARGE)
        type_path = child(path, "type")
        if "type" not in grader:
            raise GraderError(f"Missing required field '{type_path}'.", type_path)
        kind = grader["type"]
        if not isinstance(kind, str) or kind not in GRADER_TYPES:
            shown = repr(kind)[:80] if isinstance(kind, str) else type_name(kind)
            raise GraderError(f"'{type_path}' must be one of {', '.join(GRADER_TYPES)}; got {shown}.", type_path)
        if kind in REFUSED_TYPES:
            raise GraderError(REFUSED_TYPES[kind], type_path, GRADER_NOT_SUPPORTED)
        if kind != "multi":
            return _LEAVES[kind](grader, path)
        if nesting >= MAX_MULTI_NESTING:
            raise GraderError(f"Multi graders nest at most {MAX_MULTI_NESTING} deep.", path, GRADER_TOO_LARGE)
        return compile_multi(grader, path, lambda sub, sub_path: self.compile(sub, sub_path, nesting + 1))
