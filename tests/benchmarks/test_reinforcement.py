"""The reinforcement benchmark's own logic: the prompts and the grader it trains with, one run as the service
would make it, and the targets."""

from __future__ import annotations

import math

import pytest

from benchmarks import quality_llm
from benchmarks import reinforcement as rl
from benchmarks.reinforcement import GRADER, Settings, check_targets, sst2_prompt, summarise
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
def test_the_grader_rewards_naming_the_right_sentiment_only(answer, reward):
    assert run_grader(GRADER, answer, {"label": "positive", "wrong": "negative"}).reward == reward


def test_one_run_trains_a_reinforcement_job_as_the_service_would(tmp_path, tiny_sst2, monkeypatch):
    base = tiny_sst2
    settings = Settings(train_size=8, eval_size=4, seeds=1, jobs=1, threads_per_job=1)
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
    row = summarise("svfit", [record], before)
    assert row["reward_gain"] == pytest.approx(record["reward"] - before["reward"])


def _row(name, reward, gain, sd, params):
    return {"task": "sst2", "name": name, "status": "ok", "reward_mean": reward, "reward_gain": gain, "gain_sd": sd,
            "gain_sd_kind": "std over seeds", "trainable_params": params}


def test_targets_judge_each_gain_by_its_spread_and_svfit_against_lora():
    rows = [_row("svfit", 0.5, 0.3, 0.1, 1_000), _row("lora", 0.4, 0.2, 0.15, 50_000), _row("full", 0.1, 0.1, 0.1, 10**8)]
    met = {t["name"]: t["met"] for t in check_targets(rows)}
    assert met == {"sst2_svfit_gain": True, "sst2_lora_gain": False, "sst2_full_gain": False,
                   "sst2_svfit_gain_minus_lora": True, "sst2_lora_params_over_svfit": True}
