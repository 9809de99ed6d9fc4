"""Reinforcement in the training library: the prompt format, sampling as the engine samples, group advantages,
the clipped objective, the KL reference (the adapter switched off), training that raises the reward, and
pause / resume."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace

import pytest
import torch

from svfit_core.errors import ConfigError
from svfit_core.loading import load_base_model
from svfit_core.model import inject_svfit
from svfit_core.config import SVFitConfig
from svfit_core.training import PeftSpec, TrainConfig
from svfit_core.training.data import detect_format, task_for_format, validate_jsonl_line
from svfit_core.training.encoding import encode_prompt
from svfit_core.training.reinforcement import clipped_surrogate, group_advantages
from svfit_core.sampling import eos_token_ids
from svfit_core.training.rollouts import sample_answers
from svfit_core.training.run_config import HyperparameterError
from tests.svfit_core.test_training import SVFIT_QV, _assert_same_adapter, train

PROMPTS = [{"messages": [{"role": "user", "content": word}], "target": "good"}
           for word in "hello world what how why who the a".split()]
RL_CONFIG = TrainConfig(n_epochs=2, batch_size=4, eval_every=2, seed=0, learning_rate=3e-2, samples_per_prompt=8,
                        max_completion_tokens=6, max_seq_length=48)


def share_of_target_words(items: list[dict], texts: list[str]) -> list[float]:
    """The reward these tests train on: the share of the answer's words that are the line's `target`."""
    return [sum(w == item["target"] for w in text.split()) / max(1, len(text.split()))
            for item, text in zip(items, texts, strict=True)]


@pytest.fixture(scope="module")
def llama(tiny_case_factory):
    return tiny_case_factory("llama", "causal").path


# -- the format ------------------------------------------------------------------------------------------


def test_a_conversation_awaiting_the_answer_is_a_prompt_and_trains_a_causal_lm():
    assert detect_format(PROMPTS[0]) == "prompt" and task_for_format("prompt") == "causal"
    assert validate_jsonl_line(json.dumps(PROMPTS[0]).encode(), 1) == ("prompt", [])
    answered = {"messages": [*PROMPTS[0]["messages"], {"role": "assistant", "content": "hi"}]}
    assert detect_format(answered) == "chat"


@pytest.mark.parametrize("line, expected", [
    ({"messages": [{"role": "user", "content": "hi", "weight": 1}]}, "a prompt is context"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": []}, "'tools' is not supported"),
    ({"messages": [{"role": "user", "content": 3}]}, "'content' must be a string"),
])
def test_a_bad_prompt_line_is_named_with_its_line_number(line, expected):
    fmt, errors = validate_jsonl_line(json.dumps(line).encode(), 7)
    assert fmt == "prompt" and errors and all(e.startswith("line 7:") for e in errors)
    assert any(expected in e for e in errors)


def test_a_prompt_renders_with_the_generation_prompt_and_keeps_its_end_when_cut(llama):
    _model, tokenizer = load_base_model(llama, "causal")
    encoded = encode_prompt(PROMPTS[0], tokenizer, 64)
    assert tokenizer.decode(encoded.input_ids) == "<s> user : hello </s> <s> assistant :"
    assert encoded.item is PROMPTS[0] and not encoded.truncated
    cut = encode_prompt(PROMPTS[0], tokenizer, 3)
    assert cut.truncated and cut.input_ids == encoded.input_ids[-3:]


def test_reinforcement_settings_are_validated():
    for name, value in [("samples_per_prompt", 1), ("max_completion_tokens", 0), ("sampling_temperature", 0.0),
                        ("kl_coef", -0.1), ("clip_epsilon", float("nan")), ("eval_samples", 0)]:
        with pytest.raises(HyperparameterError) as err:
            replace(RL_CONFIG, **{name: value}).validate()
        assert err.value.param == name


# -- sampling, advantages, the objective -------------------------------------------------------------------


def test_greedy_sampling_of_prompts_of_different_lengths_matches_generate(llama):
    model, tokenizer = load_base_model(llama, "causal")
    model.eval()
    prompts = [encode_prompt(p, tokenizer, 64).input_ids for p in PROMPTS[:2]]
    prompts.append(encode_prompt({"messages": [{"role": "system", "content": "be very good"},
                                               {"role": "user", "content": "what is this"}]}, tokenizer, 64).input_ids)
    stops = eos_token_ids(model, tokenizer)
    answers = sample_answers(model, prompts, max_tokens=5, temperature=0.0, stop_ids=stops,
                             pad_id=tokenizer.pad_token_id, device=torch.device("cpu"),
                             generators=[torch.Generator() for _ in prompts], autocast=torch.no_grad)
    for prompt, answer in zip(prompts, answers, strict=True):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                               eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id)
        assert answer == alone[0, len(prompt):].tolist()


def test_seeded_sampling_repeats_and_different_seeds_differ(llama):
    model, tokenizer = load_base_model(llama, "causal")
    prompt = [encode_prompt(PROMPTS[0], tokenizer, 64).input_ids] * 4

    def draw(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sample_answers(model, prompt, max_tokens=6, temperature=1.0, stop_ids=frozenset(),
                              pad_id=tokenizer.pad_token_id, device=torch.device("cpu"), generators=gens,
                              autocast=torch.no_grad)

    assert draw([1, 2, 3, 4]) == draw([1, 2, 3, 4])
    assert len({tuple(a) for a in draw([1, 2, 3, 4])}) > 1


def test_advantages_are_standardised_within_each_group_and_zero_for_a_tied_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    advantages = group_advantages(rewards)
    assert torch.allclose(advantages[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    assert torch.equal(advantages[1], torch.zeros(4))


def test_the_clip_stops_a_token_that_moved_past_epsilon_in_its_advantages_direction():
    sampling = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    logprobs = torch.log(torch.tensor([0.5, 0.7, 0.7])).requires_grad_(True)  # ratio 1, 1.4, 1.4
    advantages = torch.tensor([1.0, 1.0, -1.0])
    clipped_surrogate(logprobs, sampling, advantages, 0.2).sum().backward()
    # Ratio 1: the plain policy gradient A · ratio. Ratio 1.4 with A > 0: clipped, no pull. With A < 0 the
    # unclipped term is the smaller, so the push down stays.
    assert logprobs.grad[0] == pytest.approx(1.0)
    assert logprobs.grad[1] == 0.0
    assert logprobs.grad[2] == pytest.approx(-1.4)


def test_an_svfit_model_with_its_adapter_switched_off_is_its_base(llama):
    base, _tok = load_base_model(llama, "causal")
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    before = base(input_ids=ids).logits.detach()
    model = inject_svfit(base, SVFitConfig(rank=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for sigma in model.svfit_parameters():
            sigma.mul_(1.5)
    assert not torch.allclose(model(input_ids=ids).logits, before, atol=1e-4)
    with model.disable_adapter():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)
    assert not torch.allclose(model(input_ids=ids).logits, before, atol=1e-4)  # switched back on
    model.merge()
    with pytest.raises(ConfigError):
        with model.disable_adapter():
            pass


# -- training --------------------------------------------------------------------------------------------


def test_full_fine_tuning_learns_to_say_the_rewarded_word(llama, tmp_path):
    config = replace(RL_CONFIG, n_epochs=10, learning_rate=3e-2, eval_every=4)
    result, rec = train(llama, PROMPTS, PROMPTS[:4], PeftSpec(method="full"), config, tmp_path,
                        reward=share_of_target_words)
    assert result.ended_by == "completion" and rec.info["objective"] == "reinforcement"
    assert rec.evals[0]["valid_reward"] < 0.2 and rec.evals[-1]["valid_reward"] > 0.7
    assert set(rec.steps[0]) >= {"train_loss", "train_reward", "train_kl", "train_answer_tokens"}
    assert "train_mean_token_accuracy" not in rec.steps[0]
    # The starting model is the reference: no divergence before the first update, some after.
    assert rec.steps[0]["train_kl"] < 1e-6 < rec.steps[-1]["train_kl"]
    meta = json.loads((result.adapter_dir / "training_meta.json").read_text())
    assert meta["objective"] == "reinforcement" and meta["task"] == "causal"


@pytest.mark.parametrize("spec", [SVFIT_QV, PeftSpec(method="lora", rank=4, target_modules=["q_proj", "v_proj"])],
                         ids=["svfit", "lora"])
def test_adapters_start_at_their_reference_and_move_away_from_it(spec, llama, tmp_path):
    lr = 0.5 if spec.method == "svfit" else 3e-2
    result, rec = train(llama, PROMPTS, None, spec, replace(RL_CONFIG, learning_rate=lr), tmp_path,
                        reward=share_of_target_words)
    assert result.ended_by == "completion"
    assert rec.steps[0]["train_kl"] < 1e-6 < rec.steps[-1]["train_kl"]


def test_pause_and_resume_of_reinforcement_is_exact(llama, tmp_path):
    full, full_rec = train(llama, PROMPTS, PROMPTS[:4], SVFIT_QV, replace(RL_CONFIG, learning_rate=0.5),
                           tmp_path / "full", reward=share_of_target_words)
    paused, first = train(llama, PROMPTS, PROMPTS[:4], SVFIT_QV, replace(RL_CONFIG, learning_rate=0.5),
                          tmp_path / "split", stop_after=3, reward=share_of_target_words)
    resumed, second = train(llama, PROMPTS, PROMPTS[:4], SVFIT_QV, replace(RL_CONFIG, learning_rate=0.5),
                            tmp_path / "split", resume_from=paused.last_checkpoint, reward=share_of_target_words)
    assert first.steps + second.steps == full_rec.steps
    assert first.evals + second.evals == full_rec.evals
    _assert_same_adapter(resumed.adapter_dir, full.adapter_dir)


def test_prompts_need_a_reward_and_a_method_with_a_reference(llama, tmp_path):
    with pytest.raises(ConfigError) as err:
        train(llama, PROMPTS, None, SVFIT_QV, RL_CONFIG, tmp_path / "a")
    assert err.value.code == "reward_required"
    with pytest.raises(ConfigError) as err:
        train(llama, PROMPTS, None, PeftSpec(method="pissa", rank=4), RL_CONFIG, tmp_path / "b",
              reward=share_of_target_words)
    assert err.value.code == "not_supported"
    with pytest.raises(ConfigError) as err:
        train(llama, PROMPTS, None, SVFIT_QV, replace(RL_CONFIG, max_seq_length=6), tmp_path / "c",
              reward=share_of_target_words)
    assert "max_completion_tokens" in str(err.value)


def test_a_supervised_checkpoint_cannot_resume_as_reinforcement(llama, tmp_path):
    from tests.svfit_core.test_training import CHAT, CHAT_CONFIG

    paused, _ = train(llama, CHAT, None, SVFIT_QV, CHAT_CONFIG, tmp_path, stop_after=1)
    with pytest.raises(ConfigError) as err:
        train(llama, PROMPTS, None, SVFIT_QV, replace(RL_CONFIG, n_epochs=2), tmp_path,
              resume_from=paused.last_checkpoint, reward=share_of_target_words)
    assert err.value.code == "checkpoint_mismatch"


# -- continuing a fine-tune ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_adapter(llama, tmp_path_factory):
    """A supervised SVFit fine-tune of the tiny Llama, the starting point of the runs below."""
    from tests.svfit_core.test_training import CHAT, CHAT_CONFIG

    # A large rate: the fine-tune must be far from the base for the tests to tell the two apart.
    config = replace(CHAT_CONFIG, n_epochs=4, learning_rate=1.0)
    result, _ = train(llama, CHAT, None, SVFIT_QV, config, tmp_path_factory.mktemp("sft"))
    return result.adapter_dir


def _logits_of(llama, adapter_dir, *, adapter_off: bool = False) -> torch.Tensor:
    from svfit_core.training.outputs import load_trained_model

    model = load_trained_model(llama, adapter_dir)[0]
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    with torch.no_grad(), (model.disable_adapter() if adapter_off else contextlib.nullcontext()):
        return model(input_ids=ids).logits


def test_reinforcement_continuing_a_fine_tune_holds_to_that_fine_tune(llama, sft_adapter, tmp_path):
    from svfit_core.training import run_training

    from tests.svfit_core.test_training import Recorder

    assert (_logits_of(llama, sft_adapter) - _logits_of(llama, sft_adapter, adapter_off=True)).abs().max() > 0.1
    continued = Recorder()
    run_training(llama, PROMPTS, None, SVFIT_QV, replace(RL_CONFIG, n_epochs=1, learning_rate=0.5), tmp_path,
                 continued, reward=share_of_target_words, start_from=sft_adapter)
    # The KL term measures the distance to the fine-tune started from (far from the base): none before the
    # first update.
    assert continued.steps[0]["train_kl"] < 1e-6 < continued.steps[-1]["train_kl"]


def test_dpo_continuing_a_fine_tune_starts_from_it(llama, sft_adapter, tmp_path):
    from svfit_core.training import run_training

    from tests.svfit_core.test_preference import DPO_CONFIG, PREFERENCES
    from tests.svfit_core.test_training import Recorder

    recorder = Recorder()
    result = run_training(llama, PREFERENCES, None, SVFIT_QV, replace(DPO_CONFIG, n_epochs=1), tmp_path, recorder,
                          start_from=sft_adapter)
    assert recorder.steps[0]["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # the reference is the start
    base = _logits_of(llama, sft_adapter, adapter_off=True)
    started, trained = _logits_of(llama, sft_adapter), _logits_of(llama, result.adapter_dir)
    # Continued: near the fine-tune it started from, which is far from the base.
    assert (trained - started).abs().max() < (started - base).abs().max()


def test_a_fine_tune_continues_only_with_its_own_method(llama, sft_adapter, tmp_path):
    from svfit_core.training import run_training

    with pytest.raises(ConfigError) as err:
        run_training(llama, PROMPTS, None, PeftSpec(method="lora", rank=4), RL_CONFIG, tmp_path,
                     reward=share_of_target_words, start_from=sft_adapter)
    assert err.value.code == "start_mismatch"
