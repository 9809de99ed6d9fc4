"""score_model and label_model with a fake `complete`: the rendered messages it gets, the score parsed
from its answer and clamped, labels, and each failure as its error flag with reward 0."""

from __future__ import annotations

import pytest

from graders import ModelAnswer, run_grader
from graders.limits import MAX_ANSWER_CHARS
from tests.graders.builders import label_model, refused, score_model

ITEM = {"answer": "Paris"}


class FakeModel:
    """Answers every call with `answer` (a string, a ModelAnswer, or an exception to raise) and keeps the calls."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def __call__(self, model, messages, sampling_params):
        self.calls.append((model, messages, sampling_params))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def grade(answer, grader=None, sample="Paris"):
    fake = FakeModel(answer)
    return run_grader(grader or score_model(), sample, ITEM, complete=fake), fake


def test_the_model_gets_rendered_messages_and_only_the_sampling_params_that_are_set():
    grader = score_model(sampling_params={"temperature": 0.0, "max_completions_tokens": 64, "seed": None})
    grader["input"] = [
        {"role": "developer", "content": "You grade answers.", "type": "message"},
        {"role": "user", "content": [{"type": "input_text", "text": "Answer: {{sample.output_text}}"},
                                     "Reference: {{item.answer}}"]},
    ]
    result, fake = grade('{"result": 1}', grader, sample="Lyon")
    assert result.ok and result.reward == 1.0
    model, messages, params = fake.calls[0]
    assert model == "judge-model"
    assert messages == [
        {"role": "system", "content": "You grade answers."},  # developer is sent as system
        {"role": "user", "content": "Answer: Lyon\nReference: Paris"},
    ]
    assert params == {"temperature": 0.0, "max_completions_tokens": 64}


@pytest.mark.parametrize(
    ("answer", "reward"),
    [
        ('{"result": 0.7}', 0.7),
        ('{"steps": [{"description": "step 1", "conclusion": "ok"}], "result": 0.25}', 0.25),
        ('{"score": 0.4}', 0.4),
        ('{"result": "0.6"}', 0.6),
        ('Reasoning first.\n```json\n{"result": 0.9}\n```', 0.9),
        ('The grade is {"result": 0.3} as shown.', 0.3),
        ("0.8", 0.8),
        ("I would give it 0.65 overall.", 0.65),
        ("7", 1.0),  # clamped to the default range [0, 1]
        ("-3", 0.0),
        ('{"result": 1.5}', 1.0),
    ],
)
def test_score_parsing_and_clamping(answer, reward):
    result, _ = grade(answer)
    assert result.ok, result.errors
    assert result.reward == pytest.approx(reward)


def test_a_custom_range():
    result, _ = grade("7", score_model(range=[0, 10]))
    assert result.reward == 7.0
    result, _ = grade("12 out of 10", score_model(range=[-1, 10]))
    assert result.reward == 10.0


@pytest.mark.parametrize(
    "answer",
    [
        "A great answer!",  # no number at all
        '{"steps": ["step 1: fine"], "verdict": "good"}',  # JSON without a result: not the "1" in "step 1"
        '{"result": "high"}',
        '{"result": NaN}',
        '{"result": true}',
        "",
    ],
)
def test_an_unparseable_answer_is_a_parse_error_with_reward_0(answer):
    result, _ = grade(answer)
    assert result.reward == 0.0 and not result.ok
    assert result.error_flags["model_grader_parse_error"]
    assert [e.flag for e in result.errors] == ["model_grader_parse_error"]


def test_an_overlong_answer_is_not_parsed():
    result, _ = grade("0.5 " + "x" * MAX_ANSWER_CHARS)
    assert result.reward == 0.0 and result.error_flags["model_grader_parse_error"]
    result, _ = grade("correct " * MAX_ANSWER_CHARS, label_model())
    assert result.reward == 0.0 and result.error_flags["model_grader_parse_error"]


def test_server_errors_timeouts_refusals_and_a_missing_model():
    result, _ = grade(RuntimeError("503 from replica"))
    assert result.reward == 0.0 and result.error_flags["model_grader_server_error"]
    assert "503 from replica" in result.error_flags["model_grader_server_error_details"]
    result, _ = grade(TimeoutError("30 s"))
    assert result.error_flags["unresponsive_reward_error"] and result.reward == 0.0
    result, _ = grade(ModelAnswer("", refusal="I can't help with that."))
    assert result.error_flags["model_grader_refusal_error"] and result.reward == 0.0
    result, _ = grade(42)  # not text
    assert result.error_flags["model_grader_server_error"]
    result = run_grader(score_model(), "Paris", ITEM)  # no complete callable
    assert result.error_flags["model_grader_server_error"] and result.reward == 0.0


def test_token_usage_is_reported_per_model():
    answer = ModelAnswer('{"result": 0.5}', usage={"prompt_tokens": 30, "completion_tokens": 12})
    result, _ = grade(answer)
    assert result.reward == 0.5
    assert result.token_usage == 42
    usage = {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}
    assert result.token_usage_per_model == {"judge-model": usage}
    assert result.sampled_model_name == "judge-model"
    result, _ = grade('{"result": 0.5}')
    assert result.token_usage is None and result.token_usage_per_model == {}


@pytest.mark.parametrize(
    ("answer", "reward"),
    [
        ('{"result": "correct"}', 1.0),
        ('{"label": "incorrect"}', 0.0),
        ("Correct", 1.0),  # case-insensitive
        ('"correct".', 1.0),
        ("The answer is incorrect.", 0.0),  # "correct" inside "incorrect" is not a mention
        ("After checking, this is correct.", 1.0),
    ],
)
def test_label_model(answer, reward):
    result, fake = grade(answer, label_model())
    assert result.ok, result.errors
    assert result.reward == reward
    assert fake.calls[0][1][0]["content"] == "Is Paris right? Say correct or incorrect."


@pytest.mark.parametrize("answer", ["correct or incorrect, hard to say", "maybe", '{"result": "partly"}'])
def test_label_model_parse_errors(answer):
    result, _ = grade(answer, label_model())
    assert result.reward == 0.0 and result.error_flags["model_grader_parse_error"]


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"model": ""}, "grader.model", "invalid_grader"),
        ({"input": []}, "grader.input", "invalid_grader"),
        ({"input": [{"role": "robot", "content": "x"}]}, "grader.input[0].role", "invalid_grader"),
        ({"input": [{"role": "user"}]}, "grader.input[0].content", "invalid_grader"),
        ({"input": [{"role": "user", "content": "x", "type": "note"}]}, "grader.input[0].type", "invalid_grader"),
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "x"},
                                                 {"type": "input_image", "image_url": "https://x/y.png"}]}]},
         "grader.input[0].content[1].type", "grader_not_supported"),
        ({"input": [{"role": "user", "content": {"type": "input_text", "text": "{{item.a"}}]},
         "grader.input[0].content.text", "invalid_template"),
        ({"range": [1, 0]}, "grader.range", "invalid_grader"),
        ({"range": [0, 1, 2]}, "grader.range", "invalid_grader"),
        ({"range": [0, "1"]}, "grader.range[1]", "invalid_grader"),
        ({"sampling_params": {"temperature": 3}}, "grader.sampling_params.temperature", "invalid_grader"),
        ({"sampling_params": {"top_p": 0}}, "grader.sampling_params.top_p", "invalid_grader"),
        ({"sampling_params": {"max_completions_tokens": 0}}, "grader.sampling_params.max_completions_tokens",
         "invalid_grader"),
        ({"sampling_params": {"reasoning_effort": "extreme"}}, "grader.sampling_params.reasoning_effort",
         "invalid_grader"),
        ({"sampling_params": {"max_tokens": 10}}, "grader.sampling_params.max_tokens", "invalid_grader"),
    ],
)
def test_score_model_validation_names_the_field(change, param, code):
    error = refused({**score_model(), **change})
    assert (error.param, error.code) == (param, code)


def test_label_model_validation():
    error = refused(label_model(passing=("correct", "right")))
    assert error.param == "grader.passing_labels[1]" and "not one of the labels" in error.message
    assert refused(label_model(labels=("a", "a"), passing=("a",))).param == "grader.labels[1]"
    assert refused(label_model(labels=(), passing=())).param == "grader.labels"
