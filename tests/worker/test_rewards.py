"""A reinforcement job's reward: its grader over (item, answer) pairs, a sample it cannot grade scoring 0."""

from __future__ import annotations

import pytest

from worker.rewards import GraderReward, job_reward

CONTAINS = {"type": "string_check", "name": "said", "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}", "operation": "ilike"}


def test_the_grader_scores_each_answer_against_its_line():
    reward = GraderReward(CONTAINS)
    items = [{"answer": "paris"}, {"answer": "paris"}, {"answer": "rome"}]
    assert list(reward(items, ["It is Paris.", "London", "ROME!"])) == [1.0, 0.0, 1.0]
    assert (reward.graded, reward.failed) == (3, 0) and reward.summary() is None


def test_a_line_without_the_field_the_grader_reads_scores_zero_and_is_counted():
    reward = GraderReward(CONTAINS)
    assert list(reward([{"question": "no answer field"}], ["Paris"])) == [0.0]
    assert (reward.graded, reward.failed) == (1, 1)
    assert reward.summary().startswith("1 of 1 sampled answers could not be graded and scored 0; the first: ")


def test_only_a_reinforcement_job_has_a_reward():
    assert job_reward({"type": "supervised"}) is None and job_reward(None) is None
    assert isinstance(job_reward({"type": "reinforcement", "reinforcement": {"grader": CONTAINS}}), GraderReward)


def test_a_model_grader_needs_the_way_to_its_models():
    judge = {"type": "score_model", "name": "judge", "model": "m", "input": [{"role": "user", "content": "rate"}]}
    with pytest.raises(ValueError, match="needs the settings and the store"):
        job_reward({"type": "reinforcement", "reinforcement": {"grader": judge}})
