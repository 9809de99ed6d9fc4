"""The string_check grader: `{type, name, input, reference, operation}` compares the rendered input with
the rendered reference and scores 1.0 or 0.0. eq and ne compare exactly; like is "input contains
reference"; ilike the same, case-insensitively (Unicode case folding)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from graders.fields import check_enum, check_keys, check_name, child
from graders.templating import Template, compile_template

if TYPE_CHECKING:
    from graders.context import GradingRun

OPERATIONS = ("eq", "ne", "like", "ilike")


@dataclass(frozen=True)
class StringCheck:
    type: ClassVar[str] = "string_check"
    name: str
    input: Template
    reference: Template
    operation: str

    def grade(self, run: GradingRun, path: str, key: str) -> float:
        text = self.input.render(run.namespaces)
        reference = self.reference.render(run.namespaces)
        return 1.0 if compare(text, reference, self.operation) else 0.0


def compare(text: str, reference: str, operation: str) -> bool:
    if operation == "eq":
        return text == reference
    if operation == "ne":
        return text != reference
    if operation == "like":
        return reference in text
    return reference.casefold() in text.casefold()


def compile_string_check(grader: Mapping, path: str) -> StringCheck:
    check_keys(grader, path, ("type", "name", "input", "reference", "operation"))
    return StringCheck(
        name=check_name(grader, path),
        input=compile_template(grader["input"], child(path, "input")),
        reference=compile_template(grader["reference"], child(path, "reference")),
        operation=check_enum(grader["operation"], child(path, "operation"), OPERATIONS),
    )
