"""The reinforcement benchmark's own logic: each task's prompts and the grader it trains with, one run as the
service would make it, and the targets."""

from __future__ import annotations

import math

import pytest

from benchmarks import quality_llm
from benchmarks import reinforcement as rl
from benchmarks.reinforcement import TASKS, Settings, arithmetic_prompts, check_targets, sst2_prompt, summarise
from graders import run_grader


def test_a_review_becomes_a_prompt_with_the_fields_the_grader_reads(monkeypatch):
    monkeypatch.setattr(quality_llm, "label_names", lambda task: ["negative", "positive"])
    chat = {"messages": [{"role": "user", "content": "a fine film"}, {"role": "assistant", "content": "positive"}]}
    line = sst2_prompt(chat)
    assert line["messages"] == [{"role": "user", "content": f"a fine film\n\n{rl.SST2_INSTRUCTION}"}]
    assert (line["label"], line["wrong"]) == ("positive", "negative")


@pytest.mark.parametrize(("answer", "reward"), [
    ("Positive.", 1.0), ("The review is positive", 1.0), ("negative", -1.0), ("positive or negative", 0.0),
    ("I cannot tell", 0.0),
])
def test_the_sst2_grader_rewards_naming_the_right_sentiment_only(answer, reward):
    assert run_grader(TASKS["sst2"].grader, answer, {"label": "positive", "wrong": "negative"}).reward == reward


def test_arithmetic_problems_are_held_out_disjoint_and_carry_their_sum():
    settings = Settings(train_size=72, eval_size=72, seeds=1, jobs=1, threads_per_job=1)
    prompts = arithmetic_prompts(settings)
    train, heldout = ([line["messages"][0]["content"] for line in prompts[part]] for part in ("train", "heldout"))
    assert len(set(train)) == len(set(heldout)) == 72 and not set(train) & set(heldout)
    line = prompts["train"][0]
    a, b = (int(x) for x in line["messages"][0]["content"].removeprefix("What is ").split("?")[0].split(" + "))
    assert line["answer"] == str(a + b) and line["messages"][0]["role"] == "user"
    assert arithmetic_prompts(settings) == prompts  # the same draw for every arm and seed
    with pytest.raises(ValueError, match="144 problems"):
        arithmetic_prompts(Settings(train_size=100, eval_size=72, seeds=1, jobs=1, threads_per_job=1))


@pytest.mark.parametrize(("answer", "reward", "exact"), [
    ("12", 1.0, True), ("5 + 7 = 12.", 1.0, True), ("The answer is 12, not 13", 1.0, False), ("11", 0.0, False),
    ("When dealing with sums", 0.0, False),
])
def test_the_arithmetic_grader_rewards_saying_the_sum(answer, reward, exact):
    item = {"answer": "12"}
    assert run_grader(TASKS["arithmetic"].grader, answer, item).reward == reward
    assert rl.answer_shares("arithmetic", [item], [answer], [reward])["exact"] == float(exact)


def test_one_run_trains_a_reinforcement_job_as_the_service_would(tmp_path, tiny_sst2, monkeypatch):
    base = tiny_sst2
    settings = Settings(train_size=8, eval_size=4, seeds=1, jobs=1, threads_per_job=1, tasks=("sst2",))
    job = {"task": "sst2", "arm": "svfit", "seed": 0, "settings": settings.__dict__, "base": str(base),
           "workdir": str(tmp_path)}
    record = rl.run_one(job)
    assert record["status"] == "ok", record.get("error")
    hyperparameters = record["hyperparameters"]
    steps = hyperparameters["n_epochs"] * math.ceil(8 / hyperparameters["batch_size"])
    assert record["steps"] == steps and len(record["curve"]) == steps and record["samples_per_prompt"] == 4
    assert all(-1 <= point["train_reward"] <= 1 for point in record["curve"])
    assert record["heldout_answers"] == 4 * rl.EVAL_SAMPLES and -1 <= record["reward"] <= 1

    before = rl.run_one({**job, "arm": "base"})
    assert before["status"] == "ok", before.get("error")
    row = summarise("sst2", "svfit", [record], before)
    assert row["reward_gain"] == pytest.approx(record["reward"] - before["reward"])
    assert row["peft"]["max_completion_tokens"] == TASKS["sst2"].max_completion_tokens


def _row(name, reward, gain, sd, params):
    return {"task": "sst2", "name": name, "status": "ok", "reward_mean": reward, "reward_gain": gain, "gain_sd": sd,
            "gain_sd_kind": "std over seeds", "trainable_params": params}


def test_targets_judge_each_gain_by_its_spread_and_svfit_against_lora():
    rows = [_row("svfit", 0.5, 0.3, 0.1, 1_000), _row("lora", 0.4, 0.2, 0.15, 50_000), _row("full", 0.1, 0.1, 0.1, 10**8)]
    met = {t["name"]: t["met"] for t in check_targets(rows)}
    assert met == {"sst2_svfit_gain": True, "sst2_lora_gain": False, "sst2_full_gain": False,
                   "sst2_svfit_gain_minus_lora": True, "sst2_lora_params_over_svfit": True}
    other_task = [{**_row("svfit", 0.5, 0.01, 0.1, 1_000), "task": "arithmetic"}]
    assert {t["name"]: t["met"] for t in check_targets(rows + other_task)}["arithmetic_svfit_gain"] is False
