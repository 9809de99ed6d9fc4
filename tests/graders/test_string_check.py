"""string_check: the four operations score 1.0 or 0.0 on the rendered input and reference."""

from __future__ import annotations

import pytest

from graders import run_grader
from tests.graders.builders import refused, string_check


@pytest.mark.parametrize(
    ("operation", "sample", "answer", "reward"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "Paris ", "Paris", 0.0),  # exact: no trimming
        ("eq", "paris", "Paris", 0.0),
        ("ne", "Lyon", "Paris", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "The capital is Paris.", "Paris", 1.0),  # input contains reference
        ("like", "The capital is paris.", "Paris", 0.0),  # case-sensitive
        ("like", "Paris", "The capital is Paris.", 0.0),  # not the other way round
        ("ilike", "THE CAPITAL IS PARIS.", "paris", 1.0),
        ("ilike", "Die Straße", "STRASSE", 1.0),  # Unicode case folding
        ("ilike", "Lyon", "paris", 0.0),
    ],
)
def test_each_operation(operation, sample, answer, reward):
    result = run_grader(string_check(operation), sample, {"answer": answer})
    assert result.ok
    assert result.reward == reward
    assert result.sub_rewards == {} and result.type == "string_check" and result.name == "exact"


def test_both_sides_are_templates_and_non_string_values_render_as_json():
    grader = string_check("eq", input="{{sample.output_json.n}}", reference="{{item.expected}}")
    assert run_grader(grader, '{"n": 42}', {"expected": 42}).reward == 1.0
    assert run_grader(grader, '{"n": true}', {"expected": True}).reward == 1.0
    assert run_grader(grader, '{"n": 41}', {"expected": 42}).reward == 0.0


def test_literal_text_around_variables():
    grader = string_check("eq", input="answer: {{sample.output_text}}!", reference="answer: {{item.answer}}!")
    assert run_grader(grader, "4", {"answer": "4"}).reward == 1.0


def test_unknown_operation_is_refused_naming_the_field():
    error = refused(string_check("contains"))
    assert (error.param, error.code) == ("grader.operation", "invalid_grader")
    assert "eq, ne, like, ilike" in error.message
