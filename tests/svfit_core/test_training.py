"""The training loop on tiny models: callbacks, cancel and pause, exact resume, a golden loss, config and
data errors, gradient accumulation."""

from __future__ import annotations

import json

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from svfit_core.loading import load_base_model
from svfit_core.training.outputs import load_trained_model
from svfit_core.errors import DataError
from svfit_core.training.run_config import HyperparameterError
from svfit_core.training import PeftSpec, TrainConfig, TrainingCallbacks, TrainResult, run_training

WORDS = ["good", "bad", "great", "terrible", "yes", "no"]

CHAT = [
    {"messages": [
        {"role": "system", "content": "you are good"},
        {"role": "user", "content": f"what is the {noun}"},
        {"role": "assistant", "content": f"the {noun} is {word}"},
    ]}
    for noun in ("movie", "food", "book")
    for word in ("good", "bad", "great", "terrible")
]  # 12 examples
CHAT[0]["messages"].extend([{"role": "user", "content": "why"}, {"role": "assistant", "content": "no", "weight": 0}])

PAIRS = [
    {"text": f"the {noun} is {word}", "text_pair": f"i {verb} it", "label": (i + j) % 3}
    for i, (noun, word) in enumerate([("movie", "good"), ("food", "bad"), ("book", "great"), ("film", "terrible")])
    for j, verb in enumerate(("love", "hate", "like"))
]  # 12 examples, 3 labels

# Recorded from the first correct run of `svfit_chat_run` (seed 0, CPU, fp32). A change here means the
# numerics of the loop, the data path or the SVFit layer changed: check it was meant, then update.
GOLDEN_FIRST_LOSS = 4.587347793579101
GOLDEN_LAST_LOSS = 4.526974487304687


class Recorder(TrainingCallbacks):
    """Keeps everything the loop reports; stops ("pause" / "cancel") once ``stop_after`` steps are done (a
    stop during setup is asked for with ``stop_after_matrices``)."""

    def __init__(self, stop_after: int | None = None, decision: str = "pause") -> None:
        self.info: dict = {}
        self.steps: list[dict] = []
        self.evals: list[dict] = []
        self.checkpoints: list[tuple[int, Path]] = []
        self.epoch_checkpoints: list[int] = []
        self.stop_after, self.decision = stop_after, decision
        self.setup_progress: list[tuple[int, int]] = []
        self.stop_after_matrices: int | None = None

    def on_setup_progress(self, done, total):
        self.setup_progress.append((done, total))

    def on_start(self, info):
        self.info = info

    def on_step(self, metrics):
        self.steps.append(metrics)

    def on_eval(self, metrics):
        self.evals.append(metrics)

    def on_checkpoint(self, step, path, epoch_end=False):
        self.checkpoints.append((step, path))
        if epoch_end:
            self.epoch_checkpoints.append(step)

    def should_stop(self):
        if not self.info:  # still setting up
            stop = self.stop_after_matrices is not None and len(self.setup_progress) >= self.stop_after_matrices
            return self.decision if stop else "continue"
        return self.decision if self.stop_after is not None and len(self.steps) >= self.stop_after else "continue"

    @property
    def losses(self) -> list[float]:
        return [m["train_loss"] for m in self.steps]


def train(path, examples, valid, peft, config, out, stop_after=None, decision="pause", resume_from=None, reward=None):
    recorder = Recorder(stop_after, decision)
    result = run_training(path, examples, valid, peft, config, out, recorder, resume_from=resume_from, reward=reward)
    return result, recorder


CHAT_CONFIG = TrainConfig(n_epochs=2, batch_size=4, eval_every=2, seed=0, learning_rate=5e-2)
PAIR_CONFIG = TrainConfig(n_epochs=2, batch_size=4, gradient_accumulation_steps=2, seed=1, learning_rate=5e-2)
# The SVFit job these tests (and test_data_parallel, test_training_baselines) train on the tiny Llama: every
# singular value (the tiny models are 32 wide, so rank 32 is r = k) of the q and v projections. Named, not
# PeftSpec(), so the golden loss and the parameter counts stay put when the service's defaults move.
SVFIT_QV = PeftSpec(rank=32, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def llama(tiny_case_factory) -> Path:
    return tiny_case_factory("llama", "causal").path


@pytest.fixture(scope="module")
def bert(tiny_case_factory) -> Path:
    return tiny_case_factory("bert", "classification").path


@pytest.fixture(scope="module")
def svfit_chat_run(llama, tmp_path_factory) -> tuple[TrainResult, Recorder]:
    """6 steps of SVFit on the chat set, uninterrupted; shared by several tests."""
    return train(llama, CHAT, CHAT[:4], SVFIT_QV, CHAT_CONFIG, tmp_path_factory.mktemp("svfit-chat"))


# -- callbacks -------------------------------------------------------------------------------------------


def test_callbacks_report_start_steps_and_evals(svfit_chat_run):
    result, rec = svfit_chat_run
    assert result.ended_by == "completion" and result.step == result.total_steps == 6
    info = rec.info
    assert info["task"] == "causal" and info["num_examples"] == 12 and info["truncated_examples"] == 0
    # r = k on q (32×32) and v (16×32) of two layers: 2 · (32 + 16) singular values.
    assert info["trainable_params"] == 96
    assert info["peft"]["target_modules"] == ["q_proj", "v_proj"]
    assert info["config"]["learning_rate"] == 5e-2 and info["config"]["head_learning_rate"] is not None
    assert [m["step"] for m in rec.steps] == [1, 2, 3, 4, 5, 6]
    assert [m["epoch"] for m in rec.steps] == pytest.approx([1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3, 2.0])
    reported = {"train_loss", "train_mean_token_accuracy", "learning_rate", "trained_tokens", "total_steps"}
    assert reported <= set(rec.steps[0])
    assert rec.steps[-1]["trained_tokens"] == result.trained_tokens > 0
    assert [m["step"] for m in rec.evals] == [2, 4, 6]
    assert set(result.metrics) == {"train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy"}
    assert (result.adapter_dir / "training_meta.json").is_file()


def test_one_checkpoint_per_epoch_the_last_one_included(svfit_chat_run):
    result, rec = svfit_chat_run  # 2 epochs of 3 steps, no checkpoint_every
    assert rec.epoch_checkpoints == [3, 6] and [step for step, _ in rec.checkpoints] == [3, 6]
    for step, path in rec.checkpoints:
        meta = json.loads((path / "training_meta.json").read_text())
        assert meta["step"] == step and meta["epoch_end"] is True


def test_the_adapter_records_whether_a_classifier_was_trained_on_text_pairs(svfit_chat_run, bert, tmp_path):
    # Serving reads it: a pair classifier takes only pairs, a single-text one only texts (serving/requests.py).
    singles = [{"text": ex["text"], "label": ex["label"]} for ex in PAIRS]
    config = replace(PAIR_CONFIG, max_steps=1)
    pairs, _ = train(bert, PAIRS, None, PeftSpec(rank=4), config, tmp_path / "pairs")
    single, _ = train(bert, singles, None, PeftSpec(rank=4), config, tmp_path / "single")

    def meta(result: TrainResult) -> dict:
        return json.loads((result.adapter_dir / "training_meta.json").read_text())

    assert meta(pairs)["text_pair"] is True
    assert meta(single)["text_pair"] is False
    assert meta(svfit_chat_run[0])["text_pair"] is None  # a language model: not a question it answers


def test_golden_loss(svfit_chat_run):
    _, rec = svfit_chat_run
    print(f"golden: first={rec.losses[0]!r} last={rec.losses[-1]!r}")
    assert rec.losses[0] == pytest.approx(GOLDEN_FIRST_LOSS, abs=1e-5)
    assert rec.losses[-1] == pytest.approx(GOLDEN_LAST_LOSS, abs=1e-5)
    assert rec.losses[-1] < rec.losses[0]


def test_cancel_stops_within_one_step(llama, tmp_path):
    result, rec = train(llama, CHAT, None, SVFIT_QV, CHAT_CONFIG, tmp_path, stop_after=1, decision="cancel")
    assert result.ended_by == "cancel" and result.step == 1 and len(rec.steps) == 1
    assert result.adapter_dir is None and not (tmp_path / "final").exists()


def test_truncation_is_counted(llama, tmp_path):
    config = replace(CHAT_CONFIG, max_seq_length=8)
    result, rec = train(llama, CHAT, CHAT[:2], SVFIT_QV, config, tmp_path, stop_after=0, decision="cancel")
    assert result.step == 0 and rec.info["truncated_examples"] == 12 and rec.info["truncated_valid_examples"] == 2


# -- exact resume ---------------------------------------------------------------------------------------


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def test_pause_and_resume_svfit_chat_is_exact(svfit_chat_run, llama, tmp_path):
    full, full_rec = svfit_chat_run
    # Pause after step 4: past the epoch boundary (3 steps per epoch), so the data position matters.
    paused, first = train(llama, CHAT, CHAT[:4], SVFIT_QV, CHAT_CONFIG, tmp_path, stop_after=4)
    assert paused.ended_by == "pause" and paused.step == 4 and paused.adapter_dir is None
    assert paused.last_checkpoint == tmp_path / "checkpoints" / "step-4"
    # The end of epoch 1 (step 3), then the pause.
    assert first.checkpoints == [(3, tmp_path / "checkpoints" / "step-3"), (4, paused.last_checkpoint)]
    assert first.epoch_checkpoints == [3]
    assert not list((tmp_path / "checkpoints").glob("*.part"))

    resumed, second = train(llama, CHAT, CHAT[:4], SVFIT_QV, CHAT_CONFIG, tmp_path,
                            resume_from=paused.last_checkpoint)
    assert resumed.ended_by == "completion" and second.info["resumed_from_step"] == 4
    assert [m["step"] for m in second.steps] == [5, 6]
    assert first.losses + second.losses == full_rec.losses  # exactly, not approximately
    assert resumed.trained_tokens == full.trained_tokens
    assert resumed.metrics == full.metrics
    _assert_same_adapter(resumed.adapter_dir, full.adapter_dir)


def test_pause_and_resume_svfit_classification_is_exact(bert, tmp_path):
    # BERT has dropout, so this also checks that the RNG state travels with the checkpoint.
    spec = PeftSpec(rank=4)
    full, full_rec = train(bert, PAIRS, None, spec, PAIR_CONFIG, tmp_path / "full")
    paused, first = train(bert, PAIRS, None, spec, PAIR_CONFIG, tmp_path / "split", stop_after=2)
    resumed, second = train(bert, PAIRS, None, spec, PAIR_CONFIG, tmp_path / "split",
                            resume_from=paused.last_checkpoint)
    assert full_rec.info["label_names"] == ["0", "1", "2"]
    assert first.losses + second.losses == full_rec.losses
    _assert_same_adapter(resumed.adapter_dir, full.adapter_dir)


def test_pause_and_resume_banded_svfit_is_exact(llama, tmp_path):
    # The banded variant trains σ and the coupling's off-diagonals; both, and their AdamW moments, travel.
    spec, config = replace(SVFIT_QV, rank=8, band=2), replace(CHAT_CONFIG, eval_every=None)
    full, full_rec = train(llama, CHAT, None, spec, config, tmp_path / "full")
    paused, first = train(llama, CHAT, None, spec, config, tmp_path / "split", stop_after=4)
    resumed, second = train(llama, CHAT, None, spec, config, tmp_path / "split", resume_from=paused.last_checkpoint)
    # q (32×32) and v (16×32) of two layers, each r = 8 σ plus 2·(7 + 6) off-diagonal entries
    assert full_rec.info["trainable_params"] == 4 * (8 + 2 * (7 + 6))
    assert first.losses + second.losses == full_rec.losses
    _assert_same_adapter(resumed.adapter_dir, full.adapter_dir)
    bands = {k: v for k, v in _tensors(full.adapter_dir).items() if k.endswith(".band")}
    assert len(bands) == 4 and all(v.abs().max() > 0 for v in bands.values())
    optimizer = load_file(paused.last_checkpoint / "training_state.safetensors")
    assert any(k.endswith(".band_weights.exp_avg") for k in optimizer)


def test_a_checkpoint_from_before_the_band_option_resumes(llama, tmp_path):
    paused, _ = train(llama, CHAT, None, SVFIT_QV, CHAT_CONFIG, tmp_path, stop_after=1)
    state_file = paused.last_checkpoint / "training_state.json"
    state = json.loads(state_file.read_text())
    assert state["run"]["peft"].pop("band") == 0
    state_file.write_text(json.dumps(state))
    resumed, _ = train(llama, CHAT, None, SVFIT_QV, CHAT_CONFIG, tmp_path, resume_from=paused.last_checkpoint)
    assert resumed.ended_by == "completion" and resumed.step == 6


def test_a_checkpoint_is_servable(svfit_chat_run, llama, tmp_path):
    paused, _ = train(llama, CHAT, None, SVFIT_QV, CHAT_CONFIG, tmp_path, stop_after=2)
    model, tokenizer, meta = load_trained_model(llama, paused.last_checkpoint)
    assert meta["method"] == "svfit" and meta["task"] == "causal" and meta["step"] == 2
    ids = tokenizer("hello what is good", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_resume_with_other_settings_is_refused(svfit_chat_run, llama, tmp_path):
    paused, _ = train(llama, CHAT, None, SVFIT_QV, CHAT_CONFIG, tmp_path, stop_after=1)
    with pytest.raises(Exception) as info:
        run_training(llama, CHAT, None, SVFIT_QV, replace(CHAT_CONFIG, seed=5), tmp_path,
                     resume_from=paused.last_checkpoint)
    assert getattr(info.value, "code", None) == "checkpoint_mismatch"


# -- gradient accumulation ---------------------------------------------------------------------------------


def test_gradient_accumulation_does_not_change_the_result(llama, tmp_path):
    config = replace(CHAT_CONFIG, max_steps=2, eval_every=None)
    _, one = train(llama, CHAT, None, SVFIT_QV, config, tmp_path / "one")
    _, two = train(llama, CHAT, None, SVFIT_QV, replace(config, gradient_accumulation_steps=2), tmp_path / "two")
    assert two.losses == pytest.approx(one.losses, rel=1e-5)


# -- the defaults ------------------------------------------------------------------------------------------
# What a spec that names nothing trains (run_config, chosen by measurement in benchmarks/README.md,
# "Defaults"): a change here should be meant.


def test_a_spec_that_names_nothing_resolves_to_the_measured_defaults():
    svfit = PeftSpec(method="svfit").resolved()
    assert (svfit.target_modules, svfit.rank) == ("all-linear", 256)
    for method in ("lora", "pissa"):
        lora = PeftSpec(method=method).resolved()
        assert (lora.target_modules, lora.rank, lora.lora_alpha) == ("all-linear", 16, 32.0)
    # An energy rule picks r per matrix: no default rank is put beside it.
    assert PeftSpec(method="svfit", energy=0.9).resolved().rank is None


def test_a_run_with_the_default_spec_adapts_every_linear_of_the_blocks(llama, tmp_path):
    result, rec = train(llama, CHAT, None, PeftSpec(), replace(CHAT_CONFIG, max_steps=1, eval_every=None), tmp_path)
    base, _ = load_base_model(llama, "causal")
    # (out, in) of every linear inside the transformer blocks: the lm_head is not one of them.
    shapes = {name: tuple(module.weight.shape) for name, module in base.named_modules()
              if isinstance(module, torch.nn.Linear) and ".layers." in name}
    assert len(shapes) == 2 * 7  # q, k, v, o, gate, up and down of 2 blocks
    modules = json.loads((result.adapter_dir / "adapter_config.json").read_text())["modules"]
    # r = min(256, k); every tiny matrix has k ≤ 32, so each keeps all its singular values.
    assert {name: m["rank"] for name, m in modules.items()} == {name: min(256, *s) for name, s in shapes.items()}
    assert rec.info["trainable_params"] == sum(min(256, *s) for s in shapes.values())
    assert (rec.info["peft"]["target_modules"], rec.info["peft"]["rank"]) == ("all-linear", 256)


# -- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "peft, config, param",
    [
        (PeftSpec(rank=0), TrainConfig(), "rank"),
        (PeftSpec(energy=0.0), TrainConfig(), "energy"),
        (PeftSpec(energy=1.5), TrainConfig(), "energy"),
        (PeftSpec(method="adalora"), TrainConfig(), "method"),
        (PeftSpec(), TrainConfig(lr_scheduler="step"), "lr_scheduler"),
        (PeftSpec(), TrainConfig(batch_size=0), "batch_size"),
        (PeftSpec(), TrainConfig(learning_rate=-1.0), "learning_rate"),
        (PeftSpec(), TrainConfig(warmup_ratio=1.0), "warmup_ratio"),
    ],
)
def test_bad_hyperparameters_fail_before_loading_the_model(peft, config, param, tmp_path):
    # The base path does not exist: a typed config error proves nothing was loaded first.
    with pytest.raises(HyperparameterError) as info:
        run_training(tmp_path / "no-model", CHAT, None, peft, config, tmp_path)
    assert info.value.code == "invalid_hyperparameter" and info.value.param == param


@pytest.mark.parametrize(
    "train_examples, valid, config",
    [
        ([], None, TrainConfig()),
        ([{"text": "good", "label": -1}, {"text": "bad", "label": 1}], None, TrainConfig()),
        ([{"text": "good", "label": 0}, {"text": "bad", "label": 2}], None, TrainConfig(label_names=["neg", "pos"])),
        ([{"text": "good", "label": 0}], None, TrainConfig()),
        (CHAT, [{"prompt": "a", "completion": "b"}], TrainConfig()),
    ],
    ids=["empty", "negative-label", "label-out-of-range", "single-label", "mixed-formats"],
)
def test_bad_data_raises_data_error(train_examples, valid, config, tmp_path):
    with pytest.raises(DataError) as info:
        run_training(tmp_path / "no-model", train_examples, valid, PeftSpec(), config, tmp_path)
    assert info.value.code == "invalid_training_file"


def test_head_only_needs_a_classifier(llama, tmp_path):
    with pytest.raises(HyperparameterError):
        run_training(llama, CHAT, None, PeftSpec(method="head_only"), CHAT_CONFIG, tmp_path)
