"""The multi grader: `{type, name, graders: {key: grader}, calculate_output}` grades the sample with each
sub-grader and combines their rewards with the formula (graders.formula), in which each sub-grader is
named by its key. If any sub-grader fails, the multi grader's reward is 0 (with the failures recorded)
rather than a formula over a made-up 0.

`graders` is a map from key to grader, as OpenAI's API takes it; a single grader object (how the openai
package's types spell the field) is taken as a map of one, keyed by its `name`. Keys must be identifiers
(they are variables of the formula) and not the formula's function names."""

from __future__ import annotations

import keyword
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from graders.errors import GRADER_TOO_LARGE, OTHER_ERROR, GraderError, SampleError
from graders.fields import check_keys, check_name, check_object, child
from graders.formula import FUNCTIONS, Formula, FormulaEvaluationError, parse_formula
from graders.limits import MAX_SUB_GRADER_KEY_CHARS, MAX_SUB_GRADERS

if TYPE_CHECKING:
    from graders.context import GraderNode, GradingRun

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Multi:
    type: ClassVar[str] = "multi"
    name: str
    graders: tuple[tuple[str, GraderNode], ...]
    calculate_output: Formula

    def grade(self, run: GradingRun, path: str, key: str) -> float:
        errors_before = len(run.errors)
        rewards = {
            sub_key: run.grade(node, child(child(path, "graders"), sub_key), f"{key}.{sub_key}" if key else sub_key)
            for sub_key, node in self.graders
        }
        if len(run.errors) > errors_before:
            return 0.0
        try:
            return self.calculate_output.evaluate(rewards)
        except FormulaEvaluationError as exc:
            raise SampleError(OTHER_ERROR, f"calculate_output '{self.calculate_output.text[:200]}': {exc}") from None


def sub_graders(value: Any, path: str) -> dict[str, Any]:
    """The `graders` field as a map from key to grader object (not yet checked)."""
    check_object(value, path)
    if isinstance(value.get("type"), str):  # one grader object, not a map
        return {value.get("name") if isinstance(value.get("name"), str) else "": value}
    return dict(value)


def compile_multi(
    grader: Mapping, path: str, compile_child: Callable[[Any, str], GraderNode]
) -> Multi:
    """Check a multi grader; `compile_child(sub_grader, sub_path)` checks and compiles each sub-grader."""
    check_keys(grader, path, ("type", "name", "graders", "calculate_output"))
    name = check_name(grader, path)
    graders_path = child(path, "graders")
    graders = sub_graders(grader["graders"], graders_path)
    if not graders:
        raise GraderError(f"'{graders_path}' must hold at least one grader.", graders_path)
    if len(graders) > MAX_SUB_GRADERS:
        message = f"'{graders_path}' holds {len(graders)} graders; the limit is {MAX_SUB_GRADERS}."
        raise GraderError(message, graders_path, GRADER_TOO_LARGE)
    for key in graders:
        _check_key(key, graders_path)
    nodes = tuple((key, compile_child(sub, child(graders_path, key))) for key, sub in graders.items())
    formula = parse_formula(grader["calculate_output"], graders, child(path, "calculate_output"))
    return Multi(name=name, graders=nodes, calculate_output=formula)


def _check_key(key: Any, path: str) -> None:
    shown = repr(key)[:80]
    if not isinstance(key, str) or not _KEY.fullmatch(key) or len(key) > MAX_SUB_GRADER_KEY_CHARS:
        raise GraderError(
            f"'{path}': the key {shown} must be an identifier (letters, digits, _; not starting with a digit; "
            f"at most {MAX_SUB_GRADER_KEY_CHARS} characters): calculate_output names the sub-graders by their keys.",
            path,
        )
    if keyword.iskeyword(key) or key in FUNCTIONS:
        message = f"'{path}': the key '{key}' is reserved in calculate_output; choose another."
        raise GraderError(message, child(path, key))
