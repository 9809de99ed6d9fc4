"""Memory-aware batching keeps the result: micro-batches by a token budget, the chunked causal-LM loss, the
retry after running out of device memory, and the memory plan that picks the budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from svfit_core.errors import DeviceMemoryError
from svfit_core.training import PeftSpec, TrainConfig, run_training
from svfit_core.training import loop, memory
from svfit_core.training.collate import micro_batches
from svfit_core.training.encoding import IGNORE_INDEX, Encoded
from svfit_core.training.loss import causal_loss, chunked_cross_entropy
from svfit_core.training.run_config import HyperparameterError
from tests.svfit_core.test_training import Recorder
from testkit.tiny_models import load_tiny, sample_batch

NOUNS = ("movie", "food", "book", "film")
WORDS = ("good", "bad", "great", "terrible")
PAIRS_OF_32 = [(noun, word) for noun in NOUNS for word in WORDS for _ in range(2)]
# 32 chats of 16 to 22 tokens and 32 texts of 5 to 8: lengths differ within and between micro-batches, so a
# loss normalised per micro-batch instead of per step would give another gradient.
CHAT_32 = [
    {"messages": [
        {"role": "user", "content": " ".join(["what is the", noun] + ["really"] * (i % 5))},
        {"role": "assistant", "content": " ".join(["the", noun, "is"] + ["very"] * (i % 3) + [word])},
    ]}
    for i, (noun, word) in enumerate(PAIRS_OF_32)
]
TEXTS_32 = [
    {"text": " ".join(["the", noun, "is"] + ["very"] * (i % 4) + [word]), "label": int(word in ("bad", "terrible"))}
    for i, (noun, word) in enumerate(PAIRS_OF_32)
]
# Budgets that split each set's one batch of 32 into 4 micro-batches (the tests check the count).
FOUR_WAY_BUDGET = {"causal": 162, "classification": 60}


def _adapter(result) -> dict[str, torch.Tensor]:
    return load_file(Path(result.adapter_dir) / "adapter_model.safetensors")


def _train(path, examples, config, out, peft=PeftSpec(rank=8)):
    recorder = Recorder()
    result = run_training(path, examples, None, peft, config, out, recorder)
    assert result.ended_by == "completion"
    return result, recorder


# -- the token budget ----------------------------------------------------------------------------------------


def _rows(lengths: list[int]) -> list[Encoded]:
    return [Encoded(input_ids=[5] * n, labels=[5] * n) for n in lengths]


def test_token_budget_splits_as_documented():
    rows = _rows([2, 3, 5, 6, 8, 20])
    batch = [5, 3, 1, 0, 4, 2]
    # By length; a run closes when one more row would pad it past 12 tokens; the 20-token row goes alone.
    assert micro_batches(batch, rows, 1, max_tokens=12) == [[0, 1], [2, 3], [4], [5]]
    assert micro_batches(batch, rows, 1, max_tokens=1_000) == [[0, 1, 2, 3, 4, 5]]
    # gradient_accumulation_steps splits first, the budget splits each part further: the larger split wins.
    assert micro_batches(batch, rows, 3, max_tokens=1_000) == [[0, 1], [2, 3], [4, 5]]
    assert micro_batches(batch, rows, 2, max_tokens=12) == [[0, 1], [2], [3], [4], [5]]
    for g in (1, 2, 4):
        for budget in (1, 7, 12, 40):
            split = micro_batches(batch, rows, g, budget)
            assert len(split) >= g and sorted(i for micro in split for i in micro) == sorted(batch)
            for micro in split:
                assert len(micro) == 1 or len(micro) * max(len(rows[i]) for i in micro) <= budget


def test_micro_batch_fields_are_validated():
    TrainConfig(gradient_checkpointing=None, max_tokens_per_micro_batch=None).validate()
    TrainConfig(gradient_checkpointing=True, max_tokens_per_micro_batch=4096).validate()
    for bad in ({"max_tokens_per_micro_batch": 0}, {"max_tokens_per_micro_batch": 1.5},
                {"gradient_checkpointing": 1}, {"gradient_checkpointing": "auto"}):
        with pytest.raises(HyperparameterError) as info:
            TrainConfig(**bad).validate()
        assert info.value.param == next(iter(bad))


def test_memory_plan_follows_free_device_memory(tiny_case_factory, monkeypatch):
    model = load_tiny(tiny_case_factory("llama", "causal").path, "causal")
    # The tiny Llama: 2 layers, hidden 32, MLP 64, vocabulary 96. Per token, in fp32 (4 bytes):
    plain = 4 * 2 * (12 * 32 + 4 * 64)  # every layer's activations: 5,120 bytes
    checkpointed = 4 * (2 * 32 + 12 * 32 + 4 * 64)  # the layers' inputs + one layer recomputed: 2,816 bytes
    loss_chunk = 1024 * 96 * (4 + 4 + 4)
    sigma = torch.zeros(1000)  # its gradient and two Adam moments: 12,000 bytes
    usable = 512_000
    free = (usable + loss_chunk + 3 * sigma.numel() * 4) / memory.USABLE_FRACTION
    monkeypatch.setattr(memory, "free_device_memory", lambda device: int(free) + 1)

    def plan(longest_row, **given):
        args = dict(trainable=[sigma], compute_bytes=4, adapter_width=0, max_tokens=None, checkpointing=None)
        return memory.plan_memory(model, torch.device("cuda"), longest_row=longest_row, **{**args, **given})

    assert plan(64) == memory.MemoryPlan(usable // plain, False)  # 64 · 5,120 bytes fit
    assert plan(200) == memory.MemoryPlan(usable // checkpointed, True)  # 200 · 5,120 do not
    assert plan(200, checkpointing=False) == memory.MemoryPlan(usable // plain, False)  # as asked
    assert plan(200, max_tokens=77) == memory.MemoryPlan(77, True)
    assert memory.plan_memory(model, torch.device("cpu"), trainable=[sigma], compute_bytes=4, adapter_width=0,
                              longest_row=200, max_tokens=None, checkpointing=None) == memory.MemoryPlan(
        memory.CPU_TOKENS_PER_MICRO_BATCH, False)


# -- the chunked loss ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_tokens", [1, 5, 1024])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_loss_equals_the_full_logits_loss(tiny_case_factory, arch, chunk_tokens):
    model = load_tiny(tiny_case_factory(arch, "causal").path, "causal")
    batch = sample_batch(batch=3, seq=10)
    labels = batch["input_ids"].clone()
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 7:] = IGNORE_INDEX  # padding
    targets = int((labels[:, 1:] != IGNORE_INDEX).sum())

    loss_sum, correct = causal_loss(model, {**batch, "labels": labels}, chunk_tokens=chunk_tokens)
    (loss_sum / targets).backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    logits = model(**batch).logits.float()[:, :-1]  # (B, L-1, V)
    flat_labels = labels[:, 1:].reshape(-1)
    full_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_labels, ignore_index=IGNORE_INDEX,
                               reduction="sum")
    (full_sum / targets).backward()
    assert (loss_sum / targets).item() == pytest.approx((full_sum / targets).item(), abs=1e-6)
    full_correct = ((logits.reshape(-1, logits.shape[-1]).argmax(-1) == flat_labels)
                    & (flat_labels != IGNORE_INDEX)).sum()
    assert int(correct) == int(full_correct)
    for name, p in model.named_parameters():
        assert (chunked[name] - p.grad).abs().max().item() <= 1e-6, name


def test_chunks_keep_no_logits_for_backward():
    hidden = torch.randn(20, 8, requires_grad=True)  # (T, H)
    head = torch.nn.Linear(8, 50)  # V = 50
    saved: list[torch.Size] = []

    def pack(tensor):
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_sum, _ = chunked_cross_entropy(hidden, torch.randint(0, 50, (20,)), head, chunk_tokens=5)
    loss_sum.backward()
    assert saved and all(shape[-1] != 50 for shape in saved), saved  # inputs only, no (c, V) logits
    assert hidden.grad is not None and head.weight.grad is not None


# -- the split keeps the result -------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["causal", "classification"])
def test_four_micro_batches_give_the_one_micro_batch_step(tiny_case_factory, tmp_path, monkeypatch, task):
    # AdamW's first step moves each parameter by lr · sign(g), which would hide a gradient that is off by a
    # factor; plain SGD at lr 1 moves σ and the head by exactly -g.
    monkeypatch.setattr(loop, "_setup_optimizer", lambda run: torch.optim.SGD(run.param_groups, lr=1.0))
    path = tiny_case_factory("llama", task).path
    examples = CHAT_32 if task == "causal" else TEXTS_32
    config = TrainConfig(n_epochs=1, batch_size=32, learning_rate=1.0, head_learning_rate=1.0, warmup_ratio=0.0,
                         max_grad_norm=None)
    one, one_rec = _train(path, examples, config, tmp_path / "one")
    four, four_rec = _train(path, examples, TrainConfig(**{**config.__dict__,
                                                           "max_tokens_per_micro_batch": FOUR_WAY_BUDGET[task]}),
                            tmp_path / "four")
    assert one_rec.info["micro_batches_per_step"] == 1 and four_rec.info["micro_batches_per_step"] == 4
    assert four_rec.info["tokens_per_micro_batch"] == FOUR_WAY_BUDGET[task]
    assert len(one_rec.steps) == 1
    assert four_rec.losses[0] == pytest.approx(one_rec.losses[0], abs=1e-6)
    assert four_rec.steps[0]["train_mean_token_accuracy"] == one_rec.steps[0]["train_mean_token_accuracy"]
    a, b = _adapter(one), _adapter(four)
    assert a.keys() == b.keys() and any("score" in key for key in a) == (task == "classification")
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key


# -- running out of memory ------------------------------------------------------------------------------------


def _out_of_memory_on(calls: set[int] | None, monkeypatch) -> list[int]:
    """Make ``loop._loss_step`` raise a device out-of-memory error on the given calls (1-based; None: on
    every call), as CUDA would; returns the padded token counts of the micro-batches that failed."""
    real, count, failed = loop._loss_step, [0], []

    def flaky(run, batch, reference=None):
        count[0] += 1
        if calls is None or count[0] in calls:
            failed.append(batch["input_ids"].numel())
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(run, batch, reference)

    monkeypatch.setattr(loop, "_loss_step", flaky)
    return failed


@pytest.mark.parametrize("arch, task", [("bert", "classification"), ("llama", "causal")])
def test_a_step_that_runs_out_of_memory_is_retried_to_the_same_result(tiny_case_factory, tmp_path, monkeypatch,
                                                                      arch, task):
    # BERT has dropout: the retry must rewind the RNG as well as drop the failed attempt's gradients.
    path = tiny_case_factory(arch, task).path
    examples = TEXTS_32[::3] if task == "classification" else CHAT_32[::3]  # 11 examples, 3 steps of 4
    config = TrainConfig(n_epochs=1, batch_size=4, gradient_accumulation_steps=2, learning_rate=5e-2, seed=3)
    # The second micro-batch of the first step fails, after the first one's backward.
    failed = _out_of_memory_on({2}, monkeypatch)
    retried, retried_rec = _train(path, examples, config, tmp_path / "retried")
    monkeypatch.undo()
    assert len(failed) == 1
    # Without the failure: the budget the retry fell back to (half the failed micro-batch), from the start.
    clean, clean_rec = _train(path, examples, TrainConfig(**{**config.__dict__,
                                                             "max_tokens_per_micro_batch": failed[0] // 2}),
                              tmp_path / "clean")
    assert retried_rec.losses == clean_rec.losses
    a, b = _adapter(retried), _adapter(clean)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_single_row_that_runs_out_of_memory_is_retried_with_gradient_checkpointing(tiny_case_factory, tmp_path,
                                                                                   monkeypatch):
    path = tiny_case_factory("llama", "causal").path
    config = TrainConfig(n_epochs=1, batch_size=1, max_steps=3, seed=2)
    failed = _out_of_memory_on({1}, monkeypatch)
    retried, retried_rec = _train(path, CHAT_32, config, tmp_path / "retried")
    monkeypatch.undo()
    assert len(failed) == 1 and retried_rec.info["config"]["gradient_checkpointing"] is False
    clean, clean_rec = _train(path, CHAT_32, TrainConfig(**{**config.__dict__, "gradient_checkpointing": True}),
                              tmp_path / "clean")
    assert retried_rec.losses == clean_rec.losses
    a, b = _adapter(retried), _adapter(clean)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_an_example_that_never_fits_fails_with_out_of_memory(tiny_case_factory, tmp_path, monkeypatch):
    path = tiny_case_factory("llama", "causal").path
    failed = _out_of_memory_on(None, monkeypatch)
    config = TrainConfig(n_epochs=1, batch_size=4, max_seq_length=64)
    with pytest.raises(DeviceMemoryError) as info:
        run_training(path, CHAT_32[:4], None, PeftSpec(), config, tmp_path)
    assert info.value.code == "out_of_memory"
    assert "max_seq_length" in info.value.message and "with gradient checkpointing" in info.value.message
    # Halved from 4 rows to single rows, then one row again with gradient checkpointing turned on.
    assert len(failed) >= 3 and failed[-1] == failed[-2] == info.value.tokens
