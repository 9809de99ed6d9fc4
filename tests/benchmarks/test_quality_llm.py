"""benchmarks/quality_llm.py: its scoring rules, its targets, that every arm is a request the service
accepts, and one run end to end (train as the service would, answer through the serving engine) on a tiny
random Llama in seconds."""

from __future__ import annotations

import pytest

from api.core.job_spec import MIN_AUTO_STEPS, auto_batch_size, resolve_request
from benchmarks import quality_llm
from benchmarks.quality_llm import ARMS, Settings, check_targets, final_number, is_correct, majority_rate
from benchmarks.service_defaults import service_job


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("so the answer is 72.0", "72"),
        ("it costs -3.5 dollars.", "-3.5"),
        ("first 4, then 5, so 9.", "9"),
        ("no number here", None),
    ],
)
def test_the_gsm8k_answer_is_the_number_after_the_marker_or_the_last_one(text, number):
    assert final_number(text) == number


def test_exact_match_rules():
    assert is_correct("gsm8k", "... so 18 eggs.", "Janet sells 9 eggs.\n#### 18")
    assert not is_correct("gsm8k", "#### 17", "#### 18")
    assert not is_correct("gsm8k", "I do not know", "#### 18")
    assert is_correct("sst2", " positive\n", "positive")
    assert not is_correct("sst2", "Positive", "positive")  # a label is its exact name
    assert not is_correct("trec", "NUM.", "NUM")


def test_the_majority_rate_is_the_commonest_answers_share():
    rows = [{"messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": label}]}
            for i, label in enumerate(["a", "b", "a", "a"])]
    assert majority_rate("sst2", rows) == 0.75
    assert majority_rate("gsm8k", rows) is None


@pytest.mark.parametrize("arm", ARMS, ids=lambda a: a.name)
def test_every_arm_is_a_request_the_service_accepts_and_runs_as_it_would(arm):
    peft, hyperparameters = resolve_request(arm.peft, arm.hyperparameters or {}, n_examples=128)
    spec, config, used = service_job(arm.peft, 128, 3, arm.hyperparameters, max_seq_length=96)
    assert used == hyperparameters
    assert spec.method == peft["type"] and config.learning_rate == hyperparameters["learning_rate"]
    assert (config.seed, config.max_seq_length, config.n_epochs) == (3, 96, hyperparameters["n_epochs"])


def _row(task, name, em, loss=None, params=100, majority=0.5):
    row = {"task": task, "name": name, "status": "ok", "exact_match_mean": em, "trainable_params": params,
           "majority_rate": majority}
    if loss is not None:
        row["eval_loss_mean"] = loss
    return row


def test_targets_compare_svfit_with_lora_and_every_default_with_the_majority_class():
    rows = [_row("sst2", "svfit", 0.80), _row("sst2", "lora", 0.82), _row("sst2", "full", 0.45),
            _row("gsm8k", "svfit", 0.0, loss=1.10, params=1_000), _row("gsm8k", "lora", 0.0, loss=1.20,
                                                                            params=20_000)]
    met = {t["name"]: t["met"] for t in check_targets(rows)}
    assert met == {
        "sst2_svfit_minus_lora": False,
        "sst2_svfit_minus_majority": True,
        "sst2_lora_minus_majority": True,
        "sst2_full_minus_majority": False,
        "gsm8k_svfit_loss_minus_lora": True,
        "gsm8k_lora_params_over_svfit": True,
    }
    assert all({"name", "value", "limit", "unit", "met"} <= set(t) for t in check_targets(rows))


def test_one_run_trains_as_the_service_would_and_answers_through_the_engine(tmp_path, tiny_sst2, monkeypatch):
    base = tiny_sst2
    monkeypatch.setitem(quality_llm.MAX_SEQ_LENGTH, "sst2", 48)
    settings = Settings(tasks=["sst2"], train_size=8, eval_size=4, gsm8k_eval=2, gsm8k_em=2, seeds=1, jobs=1,
                        threads_per_job=1)
    job = {"task": "sst2", "arm": "svfit", "seed": 0, "settings": settings.__dict__, "base": str(base),
           "workdir": str(tmp_path)}
    record = quality_llm.run_one(job)
    assert record["status"] == "ok", record.get("error")
    # The service's rules for 8 lines: at least 100 examples seen (13 epochs), in batches small enough to give
    # MIN_AUTO_STEPS optimizer steps (3 lines a batch, 3 batches an epoch).
    hyperparameters = record["hyperparameters"]
    assert hyperparameters["n_epochs"] == 13 and hyperparameters["batch_size"] == auto_batch_size(8, 13) == 3
    assert record["steps"] == 13 * 3 >= MIN_AUTO_STEPS
    assert record["trainable_params"] > 0 and 0.0 <= record["exact_match"] <= 1.0
    assert len(record["sample_answers"]) == 3 and all(isinstance(a, str) for a in record["sample_answers"])
    assert record["truncated"] == 0


def test_the_run_log_keeps_successful_runs_for_resume_and_failed_ones_for_this_report_only(tmp_path):
    from benchmarks.runs import RunLog

    path = tmp_path / "runs.tmp"
    runlog = RunLog(path, resume=False, key=quality_llm.run_key)
    runlog.add({"task": "sst2", "arm": "svfit", "seed": 0, "status": "ok", "exact_match": 0.5})
    runlog.add({"task": "sst2", "arm": "lora", "seed": 0, "status": "error", "error": "boom"})
    assert runlog.get({"task": "sst2", "arm": "lora", "seed": 0})["status"] == "error"

    resumed = RunLog(path, resume=True, key=quality_llm.run_key)
    assert resumed.get({"task": "sst2", "arm": "svfit", "seed": 0})["exact_match"] == 0.5
    assert resumed.get({"task": "sst2", "arm": "lora", "seed": 0}) is None  # a failed run is run again
    assert RunLog(path, resume=False, key=quality_llm.run_key).done == {} and not path.exists()
