"""calculate_output: arithmetic with the usual precedence, ^ as power, the eight functions, and refusal
of everything else (calls, attributes, subscripts, lambdas, comprehensions, oversized input)."""

from __future__ import annotations

import builtins
import math

import pytest

from graders import GraderError
from graders.formula import FormulaEvaluationError, parse_formula
from graders.limits import MAX_FORMULA_CHARS

NAMES = ("a", "b", "c")
VALUES = {"a": 3.0, "b": 0.5, "c": 0.0}
PATH = "grader.calculate_output"


def value(text, values=VALUES):
    return parse_formula(text, NAMES, PATH).evaluate(values)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("10 - 4 - 3", 3),  # left-associative
        ("12 / 4 / 3", 1),
        ("2 ^ 3 ^ 2", 512),  # right-associative: 2 ^ 9
        ("2 * a ^ 2", 18),  # power before product
        ("-2 ^ 2", -4),  # power before unary minus
        ("(-2) ^ 2", 4),
        ("-a + 1", -2),
        ("a - -b", 3.5),
        ("+a", 3),
        ("a ** 2", 9),  # Python's spelling works too
        ("0.5 * a + 0.25 * b", 1.625),
        ("1e-1 * 10", 1),
        ("min(a, b, 1)", 0.5),
        ("max(a, b)", 3),
        ("max(a)", 3),
        ("abs(b - a)", 2.5),
        ("floor(b + 1)", 1),
        ("ceil(b)", 1),
        ("exp(c)", 1),
        ("sqrt(a ^ 2 + 4 ^ 2)", 5),
        ("log(exp(2))", 2),
        ("log(8, 2)", 3),
        ("max(0, min(1, a - b))", 1),
    ],
)
def test_arithmetic(text, expected):
    assert value(text) == pytest.approx(expected)


def test_the_parsed_formula_knows_which_names_it_reads():
    assert parse_formula("a + 2 * min(a, c)", NAMES, PATH).names == {"a", "c"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a / c", "division by zero"),
        ("sqrt(b - a)", "sqrt(-2.5) is undefined"),
        ("log(c)", "log(0) is undefined"),
        ("log(a, 1)", "log(3, 1) is undefined"),
        ("exp(1000)", "overflows"),
        ("10 ^ 400", "overflows"),
        ("c ^ -1", "is undefined"),
        ("(-a) ^ b", "is undefined"),
        ("1e300 * 1e300", "overflows"),
    ],
)
def test_run_time_errors_are_clear(text, message):
    with pytest.raises(FormulaEvaluationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        value(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__import__('os')", "only these functions may be called"),
        ("__import__('os').system('true')", "only these functions"),
        ("a.__class__", "attribute access"),
        ("a.real", "attribute access"),
        ("a[0]", "subscripts"),
        ("(lambda: 1)()", "only these functions"),
        ("lambda: 1", "lambda"),
        ("[x for x in a]", "comprehensions"),
        ("sum(x for x in (a, b))", "only these functions"),
        ("max(x for x in (a, b))", "comprehensions"),
        ("a if b else c", "conditional"),
        ("a < b", "comparisons"),
        ("a and b", "and/or"),
        ("'text'", "only numbers"),
        ("True", "only numbers"),
        ("1j", "only numbers"),
        ("None", "only numbers"),
        ("a % b", "not allowed"),
        ("a // b", "not allowed"),
        ("a & b", "not allowed"),
        ("a << b", "not allowed"),
        ("not a", "not allowed"),
        ("~a", "not allowed"),
        ("(a := 1)", "assignment"),
        ("min(*[a, b])", "plain arguments"),
        ("max(a, key=b)", "plain arguments"),
        ("pow(a, 2)", "only these functions"),
        ("eval('1')", "only these functions"),
        ("a(1)", "only these functions"),
        ("exp(a, b)", "takes 1 argument"),
        ("min()", "at least 1"),
        ("unknown + 1", "unknown name 'unknown'; the sub-graders are: a, b, c"),
        ("min + 1", "is a function"),
        ("1e999", "too large"),
        ("9" * 400, "too large"),
        ("a +", "not a valid formula"),
        ("a b", "not a valid formula"),
        ("a; b", "not a valid formula"),
        ("import os", "not a valid formula"),
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("{a}", "sets"),
        ("f'{a}'", "strings"),
    ],
)
def test_unsafe_or_unknown_input_is_refused(text, message):
    with pytest.raises(GraderError, match=message.replace("(", r"\(").replace("*", r"\*")) as caught:
        parse_formula(text, NAMES, PATH)
    assert (caught.value.param, caught.value.code) == (PATH, "invalid_formula")


@pytest.mark.parametrize(
    "text",
    [
        "a + " * (MAX_FORMULA_CHARS // 4) + "a",  # too long
        "(" * 70 + "a" + ")" * 70,  # parentheses too deep
        "-" * 300 + "a",  # unary minus too deep
        "+".join(["a"] * 300),  # a left-leaning chain too deep
        "2^" * 300 + "2",  # a power tower too deep (it would not finish as integers)
        "min(" * 70 + "a" + ")" * 70,
        "(" * 5000,  # past the length bound before the parser sees it
    ],
)
def test_oversized_input_is_refused_before_it_costs_anything(text):
    with pytest.raises(GraderError) as caught:
        parse_formula(text, NAMES, PATH)
    assert caught.value.code == "invalid_formula"


def test_non_string_formula():
    with pytest.raises(GraderError, match="must be a string"):
        parse_formula(["a"], NAMES, PATH)


def test_neither_eval_nor_exec_is_ever_called(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert value("max(a, b) ^ 2 / sqrt(4)") == pytest.approx(4.5)
    assert math.isfinite(value("exp(b) - log(a)"))
