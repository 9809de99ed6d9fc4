"""text_similarity: each metric on small strings whose scores are worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest

from graders import run_grader
from graders.limits import MAX_FUZZY_CHARS, MAX_SIMILARITY_TOKENS
from graders.metrics import bleu, fuzzy_match, gleu, rouge_l, rouge_n, tokens
from tests.graders.builders import refused, text_similarity

CANDIDATE = "the cat sat on mat"  # 5 tokens
REFERENCE = "the cat sat on the mat"  # 6 tokens


def score(metric, sample, answer):
    result = run_grader(text_similarity(metric), sample, {"answer": answer})
    assert result.ok, result.errors
    return result.reward


def test_tokens_are_lower_case_words_without_punctuation():
    assert tokens("The CAT, sat-on_the mat!  Ça va?") == ["the", "cat", "sat", "on", "the", "mat", "ça", "va"]


def test_fuzzy_match():
    assert score("fuzzy_match", "Paris", "Paris") == 1.0
    assert score("fuzzy_match", "Hello World!", "hello world") == 1.0  # default_process: case, trailing punctuation
    # Inner punctuation becomes a space: "hello  world" vs "hello world" is 2 * 11 / (12 + 11).
    assert score("fuzzy_match", "Hello, World!", "hello world") == pytest.approx(22 / 23)
    # Indel similarity: 2 * LCS / (len1 + len2) = 2 * 4 ("ittn") / 13.
    assert score("fuzzy_match", "kitten", "sitting") == pytest.approx(8 / 13)
    assert score("fuzzy_match", "", "Paris") == 0.0


def test_fuzzy_match_refuses_texts_past_its_bound_as_a_sample_error():
    result = run_grader(text_similarity("fuzzy_match"), "a" * (MAX_FUZZY_CHARS + 1), {"answer": "a"})
    assert result.reward == 0.0 and result.error_flags["other_error"]
    assert "rouge_l" in result.errors[0].message


@pytest.mark.parametrize("metric", ["rouge_1", "rouge_l", "bleu", "gleu"])
def test_token_metrics_refuse_texts_past_their_bound_as_a_sample_error(metric):
    long_text = "word " * (MAX_SIMILARITY_TOKENS + 1)
    result = run_grader(text_similarity(metric), long_text, {"answer": "word"})
    assert result.reward == 0.0 and result.error_flags["other_error"]
    assert str(MAX_SIMILARITY_TOKENS) in result.errors[0].message


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        # clipped overlaps 5, 3, 2, 1, 0 of candidate n-grams 5, 4, 3, 2, 1 and reference n-grams 6, 5, 4, 3, 2
        ("rouge_1", 2 * 1 * (5 / 6) / (1 + 5 / 6)),  # P 5/5, R 5/6: 10/11
        ("rouge_2", 2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5)),  # 2/3
        ("rouge_3", 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)),  # 4/7
        ("rouge_4", 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3)),  # 2/5
        ("rouge_5", 0.0),  # "the cat sat on mat" is no 5-gram of the reference
        ("rouge_l", 10 / 11),  # LCS = 5: P 5/5, R 5/6
    ],
)
def test_rouge(metric, expected):
    assert score(metric, CANDIDATE, REFERENCE) == pytest.approx(expected)


def test_rouge_l_follows_order_where_rouge_1_does_not():
    swapped = "the mat sat on the cat"
    assert rouge_n(swapped, REFERENCE, 1) == pytest.approx(1.0)  # the same six words
    assert rouge_l(swapped, REFERENCE) == pytest.approx(4 / 6)  # LCS "the sat on the"


def test_bleu():
    # precisions 5/5, 3/4, 2/3, 1/2; brevity penalty exp(1 - 6/5)
    expected = (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25 * math.exp(1 - 6 / 5)
    assert score("bleu", CANDIDATE, REFERENCE) == pytest.approx(expected)
    assert expected == pytest.approx(0.5789, abs=1e-4)
    assert score("bleu", REFERENCE, REFERENCE) == pytest.approx(1.0)


def test_bleu_smooths_an_order_without_matches_and_uses_the_effective_order():
    # 1-grams 2/3, 2-grams 1/2, 3-grams 0/1 smoothed to 1/(2 * 1); the candidate has no 4-gram: order 3.
    assert bleu("the cat sat", "the cat ran") == pytest.approx((2 / 3 * 1 / 2 * 1 / 2) ** (1 / 3))
    assert bleu("the cat", "the cat") == pytest.approx(1.0)  # an exact two-word answer is not scored 0
    assert bleu("Paris", "paris.") == pytest.approx(1.0)
    assert bleu("dogs bark loudly", "the cat sat") == 0.0  # no word in common
    assert bleu("", "the cat") == 0.0 and bleu("the cat", "") == 0.0


def test_gleu_is_min_of_precision_and_recall_over_1_to_4_grams():
    # matches 5+3+2+1 = 11; candidate n-grams 5+4+3+2 = 14; reference 6+5+4+3 = 18
    assert score("gleu", CANDIDATE, REFERENCE) == pytest.approx(11 / 18)
    assert gleu(REFERENCE, REFERENCE) == pytest.approx(1.0)
    assert gleu("", "") == 0.0


def test_empty_texts_score_zero():
    for metric in ("rouge_1", "rouge_l", "bleu", "gleu", "fuzzy_match"):
        assert score(metric, "", REFERENCE) == 0.0
    assert fuzzy_match("...", "") == 0.0


@pytest.mark.parametrize("metric", ["meteor", "cosine"])
def test_meteor_and_cosine_are_refused_as_not_supported(metric):
    error = refused(text_similarity(metric))
    assert (error.param, error.code) == ("grader.evaluation_metric", "grader_not_supported")
    assert metric in error.message and "not supported" in error.message


def test_unknown_metric_and_pass_threshold():
    error = refused(text_similarity("jaccard"))
    assert (error.param, error.code) == ("grader.evaluation_metric", "invalid_grader")
    # pass_threshold is OpenAI's evals field: checked, kept, and the reward is still the similarity.
    assert score_with_threshold(0.9) == pytest.approx(10 / 11)
    assert refused(text_similarity("rouge_1", pass_threshold=1.5)).param == "grader.pass_threshold"
    assert refused(text_similarity("rouge_1", pass_threshold="high")).param == "grader.pass_threshold"


def score_with_threshold(threshold):
    return run_grader(text_similarity("rouge_1", pass_threshold=threshold), CANDIDATE, {"answer": REFERENCE}).reward
