"""benchmarks/dpo.py: its preference pairs, its held-out metric, its targets, that every arm is a DPO request the
service accepts, and one run end to end (a DPO job as the service would train it, scored on held-out pairs) on
a tiny random Llama in seconds."""

from __future__ import annotations

import math

import pytest
import torch

from api.core.job_spec import DEFAULT_DPO_BETA, resolve_request
from benchmarks import dpo, quality_llm
from benchmarks.dpo import (
    ARMS,
    NUMBER,
    Settings,
    answer_logprobs,
    check_targets,
    dpo_job,
    gsm8k_pair,
    preference_scores,
    sst2_pair,
    summarise,
    wrong_final_number,
)
from benchmarks.quality_llm import final_number
from testkit.tiny_models import build_tiny


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def test_an_sst2_pair_prefers_the_right_label_over_the_other(monkeypatch):
    monkeypatch.setattr(quality_llm, "label_names", lambda task: ["negative", "positive"])
    pair = sst2_pair(_chat("a dull , lifeless film", "negative"))
    assert pair["preferred_output"] == [{"role": "assistant", "content": "negative"}]
    assert pair["non_preferred_output"] == [{"role": "assistant", "content": "positive"}]
    (user,) = pair["input"]["messages"]
    assert user["role"] == "user" and user["content"].startswith("a dull , lifeless film")
    assert user["content"].endswith(dpo.SST2_INSTRUCTION)
    assert sst2_pair(_chat("a joy", "positive"))["non_preferred_output"][0]["content"] == "negative"


@pytest.mark.parametrize(
    ("answer", "how", "wrong"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "plus_one",
         "She makes 9 * 2 = $<<9*2=19>>19 every day.\n#### 19"),
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "double",
         "She makes 9 * 2 = $<<9*2=36>>36 every day.\n#### 36"),
        # Both spellings of the number change, each in its own; the operands before the last `=` stay.
        ("Profit: 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000", "plus_one",
         "Profit: 200,000-130,000=$<<200000-130000=70001>>70,001\n#### 70001"),
        # An operand equal to N before the last `=` stays, and so does every earlier line.
        ("He has 3 apples.\n3*1=<<3*1=3>>3 apples\n#### 3", "plus_one",
         "He has 3 apples.\n3*1=<<3*1=4>>4 apples\n#### 4"),
        # No `=` in the last line: its statements of N change, wherever they are.
        ("Add them up.\nSo she has 12 left, 12 in all.\n#### 12", "double",
         "Add them up.\nSo she has 24 left, 24 in all.\n#### 24"),
        ("Nothing is left: 5-5=<<5-5=0>>0\n#### 0", "double", "Nothing is left: 5-5=<<5-5=1>>1\n#### 1"),  # 2*0 = 0
        ("It loses 2-5=<<2-5=-3>>-3\n#### -3", "plus_one", "It loses 2-5=<<2-5=-2>>-2\n#### -2"),
        ("Each is 5/2=<<5/2=2.5>>2.5\n#### 2.5", "double", "Each is 5/2=<<5/2=5.0>>5.0\n#### 5.0"),
        ("#### 1,234", "plus_one", "#### 1,235"),
    ],
)
def test_a_wrong_gsm8k_answer_changes_the_final_number_where_it_is_stated(answer, how, wrong):
    assert wrong_final_number(answer, how) == wrong
    assert final_number(wrong) != final_number(answer)
    assert NUMBER.sub("N", wrong) == NUMBER.sub("N", answer)  # every other character is kept


def test_a_gsm8k_answer_without_its_marker_line_is_refused():
    with pytest.raises(ValueError, match="####"):
        wrong_final_number("the answer is 18", "plus_one")


def test_a_gsm8k_pair_prefers_the_reference_answer():
    answer = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    pair = gsm8k_pair(_chat("How much does Janet make?", answer), "plus_one")
    assert pair["input"]["messages"] == [{"role": "user", "content": "How much does Janet make?"}]
    assert pair["preferred_output"][0]["content"] == answer
    rejected = pair["non_preferred_output"][0]["content"]
    assert rejected.endswith("$<<9*2=19>>19.\n#### 19") and rejected.startswith(answer.split("\n")[0])


def _pairs() -> list[dict]:
    contexts = ["good movie", "bad film", "i love this book", "terrible food", "great service", "not very good"]
    answers = [("positive", "negative"), ("no", "yes"), ("the movie was good", "bad")]
    return [dpo.preference_pair([{"role": "user", "content": c}], *answers[i % len(answers)])
            for i, c in enumerate(contexts)]


def _direct_logprob(model, tokenizer, pair: dict, key: str) -> float:
    """Σ log p of one answer's target tokens from the full logits: what the metric must equal."""
    from svfit_core.training.encoding import encode_preference

    encoded = encode_preference(pair, tokenizer, 64)
    row = encoded.chosen if key == "preferred_output" else encoded.rejected
    ids = torch.tensor([row.input_ids])
    labels = torch.tensor(row.labels[1:])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # (L-1, V)
    keep = labels != -100
    return float(logprobs[keep].gather(1, labels[keep, None]).sum())


def test_the_metric_is_each_answers_summed_logprob_and_the_share_of_pairs_won(tmp_path, monkeypatch):
    from svfit_core.loading import load_base_model

    model, tokenizer = load_base_model(build_tiny("llama", "causal", tmp_path), "causal")
    pairs = _pairs()
    logprobs = answer_logprobs(model.eval(), tokenizer, pairs)
    assert logprobs.shape == (len(pairs), 2)
    for i in (0, 2, 5):  # absolute log-probabilities of the answers, padding and batching aside
        assert logprobs[i, 0].item() == pytest.approx(_direct_logprob(model, tokenizer, pairs[i], "preferred_output"),
                                                      abs=1e-4)
        assert logprobs[i, 1].item() == pytest.approx(
            _direct_logprob(model, tokenizer, pairs[i], "non_preferred_output"), abs=1e-4)
    monkeypatch.setattr(dpo, "EVAL_PAIRS_PER_BATCH", 1)
    torch.testing.assert_close(answer_logprobs(model, tokenizer, pairs), logprobs, atol=1e-4, rtol=0)

    scores = preference_scores(logprobs)
    won = sum(float(a) > float(b) for a, b in logprobs)
    assert scores["accuracy"] == pytest.approx(won / len(pairs)) and scores["heldout_pairs"] == len(pairs)
    assert scores["margin"] == pytest.approx(float((logprobs[:, 0] - logprobs[:, 1]).mean()))
    swapped = preference_scores(logprobs.flip(1))
    assert swapped["accuracy"] == pytest.approx(1 - scores["accuracy"])  # no ties on a random model
    assert swapped["margin"] == pytest.approx(-scores["margin"])


def test_a_tie_is_not_a_win_and_each_group_has_its_own_accuracy():
    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -2.0], [-1.0, -0.5], [-0.5, -3.0]])
    scores = preference_scores(logprobs, ["positive", "positive", "negative", "negative"])
    assert scores["accuracy"] == 0.5 and scores["accuracy_by_group"] == {"negative": 0.5, "positive": 0.5}
    assert preference_scores(logprobs[:2])["accuracy"] == 0.5 and "accuracy_by_group" not in preference_scores(logprobs)


def _records(arm: str, accuracies: list[float], params: int = 100) -> list[dict]:
    return [{"task": "sst2", "arm": arm, "seed": s, "status": "ok", "accuracy": a, "margin": 0.0,
             "chosen_logprob": -1.0, "rejected_logprob": -2.0, "heldout_pairs": 100, "trainable_params": params,
             "steps": 16, "wall_s": 1.0} for s, a in enumerate(accuracies)]


BEFORE = {"accuracy": 0.5, "margin": 0.0, "chosen_logprob": -1.0}


def test_a_gain_counts_above_two_standard_deviations_over_seeds_or_the_binomial_error_with_one():
    # One seed: the binomial standard error of 0.7 on 100 pairs is 0.0458, so 2 sd = 0.092.
    one_up = summarise("sst2", "svfit", _records("svfit", [0.70]), BEFORE)
    assert one_up["gain_sd_kind"] == "binomial standard error"
    assert one_up["gain_sd"] == pytest.approx((0.7 * 0.3 / 100) ** 0.5)
    one_flat = summarise("sst2", "lora", _records("lora", [0.55], params=10_000), BEFORE)
    # Three seeds: the std over seeds (0.02 and 0.1).
    three_up = summarise("sst2", "full", _records("full", [0.60, 0.62, 0.64]), BEFORE)
    assert three_up["gain_sd_kind"] == "std over seeds" and three_up["gain_sd"] == pytest.approx(0.02)
    three_noisy = summarise("gsm8k", "svfit", _records("svfit", [0.5, 0.6, 0.7]), BEFORE)
    assert three_noisy["accuracy_gain"] == pytest.approx(0.1) and three_noisy["gain_in_sd"] == pytest.approx(1.0)

    met = {t["name"]: t["met"] for t in check_targets([one_up, one_flat, three_up, three_noisy])}
    assert met == {
        "sst2_svfit_gain": True,
        "sst2_lora_gain": False,
        "sst2_full_gain": True,
        "sst2_svfit_gain_minus_lora": True,
        "sst2_lora_params_over_svfit": True,  # 10,000 / 100
        "gsm8k_svfit_gain": False,
    }


def test_svfit_must_gain_as_much_as_lora_with_ten_times_fewer_parameters():
    svfit = summarise("sst2", "svfit", _records("svfit", [0.70], params=5_000), BEFORE)
    lora = summarise("sst2", "lora", _records("lora", [0.80], params=40_000), BEFORE)
    met = {t["name"]: t["met"] for t in check_targets([svfit, lora])}
    assert met["sst2_svfit_gain_minus_lora"] is False and met["sst2_lora_params_over_svfit"] is False
    assert all({"name", "value", "limit", "unit", "met"} <= set(t) for t in check_targets([svfit, lora]))


@pytest.mark.parametrize("arm", ARMS, ids=lambda a: a.name)
def test_every_arm_is_a_dpo_request_the_service_accepts_and_runs_as_it_would(arm):
    peft, hyperparameters = resolve_request(arm.peft, arm.hyperparameters or {}, n_examples=64, method_type="dpo")
    spec, config, used = dpo_job(arm.peft, 64, 3, arm.hyperparameters, max_seq_length=96)
    expected_beta = (arm.hyperparameters or {}).get("beta", DEFAULT_DPO_BETA)
    assert used == hyperparameters and used["beta"] == expected_beta == config.dpo_beta
    assert spec.method == peft["type"] and config.learning_rate == hyperparameters["learning_rate"]
    assert (config.seed, config.max_seq_length, config.n_epochs) == (3, 96, hyperparameters["n_epochs"])


def test_one_run_trains_a_dpo_job_as_the_service_would_and_scores_the_held_out_pairs(tmp_path, tiny_sst2, monkeypatch):
    base = tiny_sst2
    monkeypatch.setitem(dpo.MAX_SEQ_LENGTH, "sst2", 48)
    monkeypatch.setattr(dpo, "EVAL_MAX_LENGTH", 64)
    settings = Settings(tasks=["sst2"], train_size=8, eval_size=4, seeds=1, jobs=1, threads_per_job=1)
    job = {"task": "sst2", "arm": "svfit", "seed": 0, "settings": settings.__dict__, "base": str(base),
           "workdir": str(tmp_path)}
    record = dpo.run_one(job)
    assert record["status"] == "ok", record.get("error")
    # The service's rules for 8 lines: at least 100 pairs seen (13 epochs), in batches its auto rule picks.
    hyperparameters = record["hyperparameters"]
    steps = hyperparameters["n_epochs"] * math.ceil(8 / hyperparameters["batch_size"])
    assert hyperparameters["n_epochs"] == 13 and record["steps"] == steps and len(record["curve"]) == steps
    assert record["dpo_beta"] == DEFAULT_DPO_BETA and record["truncated"] == 0
    assert record["trainable_params"] > 0 and 0.0 <= record["accuracy"] <= 1.0 and record["heldout_pairs"] == 4
    assert set(record["accuracy_by_group"]) <= {"negative", "positive"}

    before = dpo.run_one({**job, "arm": "base"})
    assert before["status"] == "ok", before.get("error")
    assert before["trainable_params"] == 0 and 0.0 <= before["accuracy"] <= 1.0
    row = summarise("sst2", "svfit", [record], before)
    assert row["accuracy_gain"] == pytest.approx(record["accuracy"] - before["accuracy"])
