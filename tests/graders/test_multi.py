"""multi: the formula over the sub-graders' rewards, sub_rewards and scores, a failing sub-grader, and
validation errors that name the full path inside nested multi graders."""

from __future__ import annotations

import pytest

from graders import run_grader
from graders.limits import MAX_MULTI_NESTING, MAX_SUB_GRADERS
from tests.graders.builders import multi, python, refused, score_model, string_check, text_similarity

ITEM = {"answer": "Paris"}


def exact_and_similar(formula):
    return multi({"exact": string_check("eq"), "similar": text_similarity("rouge_1")}, formula)


def test_the_formula_combines_the_sub_rewards():
    # "Paris is big" vs "Paris": exact 0; rouge_1 P 1/3, R 1: F 1/2
    result = run_grader(exact_and_similar("0.7 * exact + 0.3 * similar"), "Paris is big", ITEM)
    assert result.ok
    assert result.reward == pytest.approx(0.15)
    assert result.sub_rewards == {"exact": 0.0, "similar": pytest.approx(0.5)}
    assert result.type == "multi" and result.name == "combined"
    result = run_grader(exact_and_similar("max(exact, similar ^ 2) - -exact"), "Paris", ITEM)
    assert result.reward == 2.0


def test_nested_multi_reports_every_sub_reward_by_dotted_key():
    inner = multi({"exact": string_check("eq"), "near": string_check("ilike")}, "(exact + near) / 2", name="inner")
    outer = multi({"inner": inner, "similar": text_similarity("rouge_l")}, "inner * similar")
    result = run_grader(outer, "paris", ITEM)
    assert result.reward == pytest.approx(0.5)  # inner (0 + 1) / 2, similar 1
    assert result.sub_rewards == {"inner": 0.5, "similar": 1.0}
    assert result.scores == {"inner.exact": 0.0, "inner.near": 1.0, "inner": 0.5, "similar": 1.0}


def test_a_failing_sub_grader_makes_the_reward_0_and_says_which_one():
    grader = multi({"exact": string_check("eq"), "judge": score_model()}, "exact + judge")
    result = run_grader(grader, "Paris", ITEM, complete=lambda *args: "no idea")
    assert result.reward == 0.0 and not result.ok
    assert result.sub_rewards == {"exact": 1.0, "judge": 0.0}
    assert [(e.flag, e.grader) for e in result.errors] == [("model_grader_parse_error", "grader.graders.judge")]


def test_a_formula_without_a_value_is_a_sample_error():
    result = run_grader(exact_and_similar("similar / exact"), "Lyon", ITEM)
    assert result.reward == 0.0 and result.error_flags["other_error"]
    assert "division by zero" in result.errors[0].message and result.errors[0].grader == "grader"


def test_graders_as_one_grader_object_as_the_openai_types_spell_it():
    grader = multi(string_check("eq", name="exact"), "2 * exact")
    assert run_grader(grader, "Paris", ITEM).reward == 2.0


@pytest.mark.parametrize(
    ("grader", "param", "code"),
    [
        (multi({"exact": string_check("equals")}, "exact"), "grader.graders.exact.operation", "invalid_grader"),
        (multi({"inner": multi({"exact": string_check("equals")}, "exact")}, "inner"),
         "grader.graders.inner.graders.exact.operation", "invalid_grader"),
        (multi({"inner": multi({"exact": string_check(input="{{ item.x")}, "exact")}, "inner"),
         "grader.graders.inner.graders.exact.input", "invalid_template"),
        (multi({"exact": string_check()}, "exact + missing"), "grader.calculate_output", "invalid_formula"),
        (multi({"inner": multi({"exact": string_check()}, "inner")}, "inner"),
         "grader.graders.inner.calculate_output", "invalid_formula"),  # the outer key is not a name inside
        (multi({"exact": string_check()}, "__import__('os')"), "grader.calculate_output", "invalid_formula"),
        (multi({"code": python()}, "code"), "grader.graders.code.type", "grader_not_supported"),
        (multi({"inner": multi({"code": python()}, "code")}, "inner"), "grader.graders.inner.graders.code.type",
         "grader_not_supported"),
        (multi({"sim": text_similarity("meteor")}, "sim"), "grader.graders.sim.evaluation_metric",
         "grader_not_supported"),
        (multi({}, "1"), "grader.graders", "invalid_grader"),
        (multi({"bad key": string_check()}, "1"), "grader.graders", "invalid_grader"),
        (multi({"1st": string_check()}, "1"), "grader.graders", "invalid_grader"),
        (multi({"min": string_check()}, "min"), "grader.graders.min", "invalid_grader"),
        (multi({"lambda": string_check()}, "1"), "grader.graders.lambda", "invalid_grader"),
        (multi({"exact": "string_check"}, "exact"), "grader.graders.exact", "invalid_grader"),
        (multi([string_check()], "exact"), "grader.graders", "invalid_grader"),
        ({"type": "multi", "name": "m", "graders": {"exact": string_check()}}, "grader.calculate_output",
         "invalid_grader"),
    ],
)
def test_validation_names_the_full_path_inside_nested_multi_graders(grader, param, code):
    error = refused(grader)
    assert (error.param, error.code) == (param, code), error.message


def test_size_limits():
    too_many = multi({f"g{i}": string_check() for i in range(MAX_SUB_GRADERS + 1)}, "g0")
    assert (refused(too_many).param, refused(too_many).code) == ("grader.graders", "grader_too_large")
    grader = string_check()
    for depth in range(MAX_MULTI_NESTING + 1):
        grader = multi({"x": grader}, "x")
    error = refused(grader)
    assert error.code == "grader_too_large"
    assert error.param == "grader" + ".graders.x" * MAX_MULTI_NESTING
    # Wide and nested: 1 + 16 + 16 * 16 graders is past the limit on the whole tree.
    wide = multi({f"m{i}": multi({f"g{j}": string_check() for j in range(16)}, "g0") for i in range(16)}, "m0")
    assert refused(wide).code == "grader_too_large"
