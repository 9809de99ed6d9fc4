"""DPO in the training library: the preference format, its encoding, the loss at the reference, training
that moves the margin, and pause / resume."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from svfit_core.errors import ConfigError
from svfit_core.loading import load_base_model
from svfit_core.training import PeftSpec, TrainConfig
from svfit_core.training.data import detect_format, task_for_format, validate_jsonl_line
from svfit_core.training.encoding import IGNORE_INDEX, encode_preference
from svfit_core.training.preference import REFERENCE_FILE, collate_pairs, sequence_logprobs
from svfit_core.training.run_config import HyperparameterError
from tests.svfit_core.test_training import SVFIT_QV, _assert_same_adapter, train


def pair(noun: str, word: str) -> dict:
    return {
        "input": {"messages": [{"role": "system", "content": "answer briefly"},
                               {"role": "user", "content": f"is the {noun} {word}"}]},
        "preferred_output": [{"role": "assistant", "content": "yes"}],
        "non_preferred_output": [{"role": "assistant", "content": f"no the {noun} is bad"}],
    }


PREFERENCES = [pair(noun, word) for noun in ("movie", "food", "book", "film") for word in ("good", "great")]  # 8
DPO_CONFIG = TrainConfig(n_epochs=3, batch_size=4, eval_every=2, seed=0, learning_rate=5e-2)
LEARNING_RATES = {"svfit": 5e-2, "lora": 5e-3, "full": 1e-3}
SPECS = {
    "svfit": SVFIT_QV,
    "lora": PeftSpec(method="lora", rank=4, target_modules=["q_proj", "v_proj"]),
    "full": PeftSpec(method="full"),
}


@pytest.fixture(scope="module")
def llama(tiny_case_factory):
    return tiny_case_factory("llama", "causal").path


# -- the format ------------------------------------------------------------------------------------------


def line(example: dict) -> bytes:
    return json.dumps(example).encode()


def test_a_preference_line_is_its_own_format_and_trains_a_causal_lm():
    assert detect_format(PREFERENCES[0]) == "preference"
    assert task_for_format("preference") == "causal"
    assert validate_jsonl_line(line(PREFERENCES[0]), 1) == ("preference", [])


@pytest.mark.parametrize("change, expected", [
    (lambda ex: ex.pop("non_preferred_output"), "missing 'non_preferred_output'"),
    (lambda ex: ex.update(input=["hi"]), "'input' must be an object"),
    (lambda ex: ex["input"].update(messages=[]), "'input.messages' must be a non-empty list"),
    (lambda ex: ex["input"]["messages"].append({"role": "assistant", "content": "x"}), "ends with an assistant"),
    (lambda ex: ex["input"]["messages"][1].update(role="robot"), "input.messages[1] has unknown role"),
    (lambda ex: ex["input"].update(tools=[]), "'input.tools' is not supported yet"),
    (lambda ex: ex.update(preferred_output={"role": "assistant", "content": "x"}), "'preferred_output' must be a list"),
    (lambda ex: ex["preferred_output"].append({"role": "assistant", "content": "x"}), "holding one assistant"),
    (lambda ex: ex["preferred_output"][0].update(role="user"), "preferred_output[0] must have role 'assistant'"),
    (lambda ex: ex["non_preferred_output"][0].update(content=3), "non_preferred_output[0] 'content' must be a string"),
    (lambda ex: ex["preferred_output"][0].update(content=""), "preferred_output[0] 'content' is empty"),
    (lambda ex: ex["non_preferred_output"][0].update(content="yes"), "the same answer"),
])
def test_a_bad_preference_line_is_named_with_its_line_number(change, expected):
    example = json.loads(json.dumps(PREFERENCES[0]))
    change(example)
    fmt, errors = validate_jsonl_line(line(example), 7)
    assert fmt == "preference"
    assert errors and all(e.startswith("line 7: ") for e in errors)
    assert any(expected in e for e in errors), errors


def test_both_answers_share_the_context_and_only_the_answer_is_trained(llama):
    _, tokenizer = load_base_model(llama, "causal")
    example = json.loads(json.dumps(PREFERENCES[0]))
    example["input"]["messages"].insert(1, {"role": "user", "content": "hello"})
    example["input"]["messages"].insert(2, {"role": "assistant", "content": "hi there"})  # context, never trained
    encoded = encode_preference(example, tokenizer, max_length=512)
    chosen, rejected = encoded.chosen, encoded.rejected
    context = next(i for i, label in enumerate(chosen.labels) if label != IGNORE_INDEX)
    assert chosen.input_ids[:context] == rejected.input_ids[:context]
    trained = [t for t, label in zip(chosen.input_ids, chosen.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained).startswith("yes")
    assert tokenizer.decode([t for t in rejected.labels if t != IGNORE_INDEX]).startswith("no the movie is bad")
    assert len(encoded) == max(len(chosen), len(rejected))


def test_sequence_logprobs_are_the_summed_token_logprobs_of_the_answer(llama):
    model, tokenizer = load_base_model(llama, "causal")
    pairs = [encode_preference(ex, tokenizer, 512) for ex in PREFERENCES[:3]]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        got = sequence_logprobs(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logprobs = F.log_softmax(logits[:, :-1], -1)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    expected = (logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)
    assert got.shape == (6,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_beta_must_be_a_positive_finite_number():
    for beta in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(HyperparameterError) as info:
            replace(DPO_CONFIG, dpo_beta=beta).validate()
        assert info.value.param == "dpo_beta"


# -- training ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["svfit", "lora", "full"])
def test_dpo_starts_at_log_2_with_zero_margin_and_learns_the_preference(method, llama, tmp_path):
    config = replace(DPO_CONFIG, learning_rate=LEARNING_RATES[method], n_epochs=4)
    result, rec = train(llama, PREFERENCES, PREFERENCES[:4], SPECS[method], config, tmp_path)
    first = rec.steps[0]
    # The policy is the reference before its first update: every reward is zero.
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["train_chosen_reward"] == pytest.approx(0, abs=1e-5)
    assert first["train_reward_margin"] == pytest.approx(0, abs=1e-5)
    assert first["train_mean_token_accuracy"] == 0  # a tie is not a win
    assert rec.info["objective"] == "dpo"
    last = rec.evals[-1]
    assert last["valid_loss"] < math.log(2) - 0.01
    assert last["valid_reward_margin"] > 0.01 and last["valid_mean_token_accuracy"] == 1.0
    assert last["valid_reward_margin"] == pytest.approx(last["valid_chosen_reward"] - last["valid_rejected_reward"])
    meta = json.loads((result.adapter_dir / "training_meta.json").read_text())
    assert meta["task"] == "causal" and meta["objective"] == "dpo"


def test_a_larger_beta_gives_larger_rewards(llama, tmp_path):
    # Adam moves the policy by about the learning rate whatever the loss's scale, and a reward is beta times
    # the policy's log-ratio to the reference: four times the beta, several times the margin.
    _, low = train(llama, PREFERENCES, None, SVFIT_QV, replace(DPO_CONFIG, n_epochs=1, dpo_beta=0.1), tmp_path / "a")
    _, high = train(llama, PREFERENCES, None, SVFIT_QV, replace(DPO_CONFIG, n_epochs=1, dpo_beta=0.4), tmp_path / "b")
    assert high.steps[-1]["train_reward_margin"] > 2 * low.steps[-1]["train_reward_margin"] > 0


@pytest.mark.parametrize("method", ["svfit", "full"])
def test_pause_and_resume_of_dpo_is_exact(method, llama, tmp_path):
    config = replace(DPO_CONFIG, learning_rate=LEARNING_RATES[method])
    full, full_rec = train(llama, PREFERENCES, PREFERENCES[:4], SPECS[method], config, tmp_path / "full")
    paused, first = train(llama, PREFERENCES, PREFERENCES[:4], SPECS[method], config, tmp_path / "split",
                          stop_after=3)
    assert (paused.last_checkpoint / REFERENCE_FILE).is_file()
    resumed, second = train(llama, PREFERENCES, PREFERENCES[:4], SPECS[method], config, tmp_path / "split",
                            resume_from=paused.last_checkpoint)
    # The resumed run compares against the saved reference, not against the model it resumed (trained).
    assert first.steps + second.steps == full_rec.steps
    assert first.evals + second.evals == full_rec.evals
    assert resumed.metrics == full.metrics
    if method == "svfit":
        _assert_same_adapter(resumed.adapter_dir, full.adapter_dir)


def test_a_dpo_checkpoint_without_its_reference_is_refused(llama, tmp_path):
    paused, _ = train(llama, PREFERENCES, None, SVFIT_QV, DPO_CONFIG, tmp_path, stop_after=1)
    (paused.last_checkpoint / REFERENCE_FILE).unlink()
    with pytest.raises(ConfigError, match="reference"):
        train(llama, PREFERENCES, None, SVFIT_QV, DPO_CONFIG, tmp_path, resume_from=paused.last_checkpoint)


def test_a_supervised_checkpoint_cannot_resume_as_dpo(llama, tmp_path):
    from tests.svfit_core.test_training import CHAT, CHAT_CONFIG

    paused, _ = train(llama, CHAT, None, SVFIT_QV, CHAT_CONFIG, tmp_path, stop_after=1)
    with pytest.raises(ConfigError, match="other settings"):
        train(llama, PREFERENCES, None, SVFIT_QV, CHAT_CONFIG, tmp_path, resume_from=paused.last_checkpoint)


def test_a_checkpoint_from_before_dpo_resumes_as_supervised(llama, tmp_path):
    from tests.svfit_core.test_training import CHAT, CHAT_CONFIG

    paused, _ = train(llama, CHAT, None, SVFIT_QV, CHAT_CONFIG, tmp_path, stop_after=1)
    state_file = paused.last_checkpoint / "training_state.json"
    state = json.loads(state_file.read_text())
    assert state["run"].pop("objective") == "supervised"
    assert state["run"]["config"].pop("dpo_beta") == 0.1
    state_file.write_text(json.dumps(state))
    resumed, _ = train(llama, CHAT, None, SVFIT_QV, CHAT_CONFIG, tmp_path, resume_from=paused.last_checkpoint)
    assert resumed.ended_by == "completion"


def test_preference_and_chat_data_cannot_be_mixed(llama, tmp_path):
    from svfit_core.errors import DataError
    from tests.svfit_core.test_training import CHAT

    with pytest.raises(DataError, match="validation data is chat"):
        train(llama, PREFERENCES, CHAT[:2], SVFIT_QV, DPO_CONFIG, tmp_path)
