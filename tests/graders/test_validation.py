"""validate_grader: one exception type, the offending field's full path and a stable code for every
refusal; python always refused; OpenAI-shaped graders accepted."""

from __future__ import annotations

import pytest
from openai.types.graders import (
    LabelModelGrader,
    MultiGrader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
)

from graders import GRADER_TYPES, GraderError, validate_grader
from graders.limits import MAX_NAME_CHARS
from tests.graders.builders import label_model, multi, python, refused, score_model, string_check, text_similarity


@pytest.mark.parametrize(
    ("grader", "model"),
    [
        (string_check(), StringCheckGrader),
        (text_similarity("bleu"), TextSimilarityGrader),
        (score_model(range=[0, 5], sampling_params={"temperature": 0.2, "reasoning_effort": "low"}), ScoreModelGrader),
        (label_model(), LabelModelGrader),
    ],
)
def test_openai_shaped_graders_are_accepted(grader, model):
    model.model_validate(grader)  # the shape the openai package describes
    assert validate_grader(grader) is None


def test_multi_graders_as_openai_documents_them_and_as_its_types_spell_them_are_accepted():
    # The API takes `graders` as a map from key to grader; the openai package types it as one grader.
    documented = multi({"exact": string_check(), "judge": score_model()}, "0.5 * exact + 0.5 * judge")
    assert validate_grader(documented) is None
    single = multi(string_check(name="exact"), "exact")
    MultiGrader.model_validate(single)
    assert validate_grader(single) is None


def test_python_is_always_refused():
    error = refused(python())
    assert (error.param, error.code) == ("grader.type", "grader_not_supported")
    assert "sandbox" in error.message
    assert refused({"type": "python"}).code == "grader_not_supported"  # before any other field is looked at


@pytest.mark.parametrize(
    ("grader", "param"),
    [
        ("string_check", "grader"),
        (None, "grader"),
        ({}, "grader.type"),
        ({"type": "regex"}, "grader.type"),
        ({"type": 3}, "grader.type"),
        ({**string_check(), "name": 7}, "grader.name"),
        ({**string_check(), "name": " "}, "grader.name"),
        ({**string_check(), "name": "n" * (MAX_NAME_CHARS + 1)}, "grader.name"),
        ({k: v for k, v in string_check().items() if k != "reference"}, "grader.reference"),
        ({**string_check(), "extra": 1}, "grader.extra"),
        ({**string_check(), "operation": None}, "grader.operation"),
    ],
)
def test_refusals_name_the_field(grader, param):
    error = refused(grader)
    assert (error.param, error.code) == (param, "invalid_grader")
    assert isinstance(error, ValueError)


def test_a_custom_root_path_and_the_error_envelope():
    with pytest.raises(GraderError) as caught:
        validate_grader(string_check("bad"), "method.reinforcement.grader")
    assert caught.value.param == "method.reinforcement.grader.operation"
    assert caught.value.to_dict() == {
        "message": caught.value.message, "type": "invalid_request_error",
        "param": "method.reinforcement.grader.operation", "code": "invalid_grader",
    }


def test_the_type_list_names_every_openai_type():
    assert set(GRADER_TYPES) == {"string_check", "text_similarity", "score_model", "label_model", "multi", "python"}
