"""Templates: lookups in the item and the sample (nested fields, array indices, output_json), errors that
name the missing field, syntax checked at validation, and nothing ever evaluated."""

from __future__ import annotations

import pytest

from graders import GraderError, run_grader
from graders.errors import SampleError
from graders.limits import MAX_PLACEHOLDERS, MAX_TEMPLATE_CHARS
from graders.templating import Namespaces, compile_template
from tests.graders.builders import refused, string_check

ITEM = {"answer": "Paris", "meta": {"city": {"name": "Lyon", "pop": 522000}}, "choices": ["a", "b"], "flag": False,
        "none": None}


def render(text, sample="", item=ITEM):
    return compile_template(text, "grader.input").render(Namespaces(sample, item))


def test_nested_fields_indices_and_whitespace_inside_braces():
    assert render("{{item.answer}}") == "Paris"
    assert render("{{ item.meta.city.name }}") == "Lyon"
    assert render("{{\titem.choices.1  }}") == "b"
    assert render("{{item.meta.city.pop}} people") == "522000 people"
    assert render("{{item.flag}}/{{item.none}}") == "false/null"  # non-strings render as JSON
    assert render("{{item.meta.city}}") == '{"name": "Lyon", "pop": 522000}'


def test_sample_namespace():
    sample = '{"answer": {"city": "Paris", "n": [1, 2]}, "ok": true}'
    assert render("{{sample.output_text}}", sample) == sample
    assert render("{{sample.output_json.answer.city}}", sample) == "Paris"
    assert render("{{sample.output_json.answer.n.0}}", sample) == "1"
    assert render("{{sample.output_json.ok}}", sample) == "true"


def test_a_missing_field_is_an_invalid_variable_error_naming_it():
    with pytest.raises(SampleError) as caught:
        render("{{item.meta.country.name}}")
    assert caught.value.flag == "invalid_variable_error"
    assert "item.meta.country.name" in caught.value.message and "'country'" in caught.value.message
    with pytest.raises(SampleError):
        render("{{item.choices.2}}")  # past the end of the array
    with pytest.raises(SampleError):
        render("{{item.answer.length}}")  # a string has no fields
    result = run_grader(string_check(reference="{{item.expected}}"), "Paris", {"answer": "Paris"})
    assert result.reward == 0.0 and result.error_flags["invalid_variable_error"]
    assert "item.expected" in result.errors[0].message and result.errors[0].grader == "grader"


def test_output_json_of_a_sample_that_is_not_json_is_a_sample_parse_error():
    with pytest.raises(SampleError) as caught:
        render("{{sample.output_json.answer}}", "Paris, I think")
    assert caught.value.flag == "sample_parse_error"
    assert render("{{sample.output_text}}", "Paris, I think") == "Paris, I think"  # no JSON needed
    with pytest.raises(SampleError) as caught:
        render("{{sample.output_json}}", "[" * 100_000)  # too deep for the parser: still just not JSON
    assert caught.value.flag == "sample_parse_error"


def test_values_are_not_templates_themselves_and_nothing_is_evaluated():
    item = {"answer": "{{item.secret}}", "secret": "s3cret", "expr": "__import__('os').getcwd()"}
    assert render("{{item.answer}}", item=item) == "{{item.secret}}"
    assert render("{{item.expr}}", item=item) == "__import__('os').getcwd()"


@pytest.mark.parametrize(
    "text",
    [
        "{{item.answer",  # never closed
        "{{ foo.bar }}",  # unknown namespace
        "{{sample.output}}",  # no such sample field
        "{{sample.output_text.x}}",  # a string has no fields
        "{{sample}}",
        "{{item.answer + 1}}",
        "{{ __import__('os') }}",
        "{{item..answer}}",
        "{{}}",
        "{{item.a b}}",
    ],
)
def test_bad_template_syntax_is_refused_at_validation(text):
    error = refused(string_check(input=text))
    assert (error.param, error.code) == ("grader.input", "invalid_template")


def test_template_size_limits():
    with pytest.raises(GraderError, match="limit"):
        compile_template("x" * (MAX_TEMPLATE_CHARS + 1), "grader.input")
    with pytest.raises(GraderError, match="more than"):
        compile_template("{{item.a}}" * (MAX_PLACEHOLDERS + 1), "grader.input")
    with pytest.raises(GraderError, match="too long"):
        compile_template("{{item." + ".".join(["a"] * 40) + "}}", "grader.input")
    error = refused(string_check(reference=["not", "a", "string"]))
    assert (error.param, error.code) == ("grader.reference", "invalid_template")


def test_plain_braces_are_just_text():
    assert render('Answer as {"result": 1} or {single}') == 'Answer as {"result": 1} or {single}'
    assert render("}} stray closers {{item.answer}} }}") == "}} stray closers Paris }}"
