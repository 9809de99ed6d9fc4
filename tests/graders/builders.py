"""Grader objects in OpenAI's shapes, for the graders tests."""

from __future__ import annotations

import pytest

from graders import GraderError, validate_grader


def string_check(operation="eq", input="{{sample.output_text}}", reference="{{item.answer}}", name="exact"):
    return {"type": "string_check", "name": name, "input": input, "reference": reference, "operation": operation}


def text_similarity(metric, input="{{sample.output_text}}", reference="{{item.answer}}", name="similar", **extra):
    return {"type": "text_similarity", "name": name, "input": input, "reference": reference,
            "evaluation_metric": metric, **extra}


def score_model(content="Grade {{sample.output_text}} against {{item.answer}}.", model="judge-model", name="judge",
                **extra):
    return {"type": "score_model", "name": name, "model": model, "input": [{"role": "user", "content": content}],
            **extra}


def label_model(labels=("correct", "incorrect"), passing=("correct",), model="judge-model", name="labeller"):
    return {"type": "label_model", "name": name, "model": model,
            "input": [{"role": "user", "content": "Is {{sample.output_text}} right? Say correct or incorrect."}],
            "labels": list(labels), "passing_labels": list(passing)}


def multi(graders, formula, name="combined"):
    return {"type": "multi", "name": name, "graders": graders, "calculate_output": formula}


def python(name="code"):
    return {"type": "python", "name": name, "source": "def grade(sample, item):\n    return 1.0\n"}


def refused(grader) -> GraderError:
    """The GraderError validate_grader raises for `grader` (fails the test if it accepts it)."""
    with pytest.raises(GraderError) as caught:
        validate_grader(grader)
    return caught.value
