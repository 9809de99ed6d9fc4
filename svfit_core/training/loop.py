"""The training loop: SFT of a causal LM (chat or prompt/completion), DPO of a causal LM (preference pairs),
reinforcement of a causal LM (prompts, graded samples), or training a sequence classifier, with SVFit or a
baseline method, resumable from any checkpoint.

``run_training`` reads top to bottom: validate, set up the model, the data and the optimizer, then loop over
optimizer steps (poll the callbacks, step, report, evaluate, checkpoint) and write the final adapter. It
knows nothing of queues or databases; the caller listens through ``TrainingCallbacks``. A data-parallel run
(``world_size`` > 1) runs this same loop in every process (``distributed.py``): rank 0, the caller's process,
calls the callbacks and writes every file; the ranks split each step's examples and sum the gradients.

Output layout under ``output_dir``: ``checkpoints/step-N/`` (servable adapter + training state) and
``final/`` (servable adapter). Every adapter folder carries ``training_meta.json``.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn

from svfit_core.training.checkpointing import (
    TrainingState,
    atomic_dir,
    capture_rng,
    flatten_optimizer,
    load_training_state,
    restore_optimizer,
    restore_rng,
    save_training_state,
)
from svfit_core.training.collate import batch_targets, batches_per_epoch, collate, epoch_batches, micro_batches
from svfit_core.training import preference, reinforcement
from svfit_core.training.data import check_examples, task_for_format
from svfit_core.training import distributed
from svfit_core.training.distributed import SOLO, Ranks
from svfit_core.training.encoding import Encoded, EncodedPreference, encode_example
from svfit_core.errors import ConfigError, DataError, DeviceMemoryError
from svfit_core.loading import DTYPES, base_dtype_for, load_base_model, max_positions
from svfit_core.training.loss import causal_loss, classification_loss, transformers_model
from svfit_core.training.memory import plan_memory
from svfit_core.training.methods import Method, get_method, setup_method
from svfit_core.training.param_groups import count_trainable
from svfit_core.training.outputs import load_trained_model, read_training_meta
from svfit_core.training.preflight import check_memory
from svfit_core.sampling import eos_token_ids
from svfit_core.training.schedule import apply_lr, lr_multiplier, warmup_steps_for
from svfit_core.bases import BasisStore
from svfit_core.targets import classification_modules
from svfit_core.training.run_config import PeftSpec, TrainConfig
from svfit_core.training.setup_resources import SetupResources
from svfit_core.training.layout import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    META_FORMAT_VERSION,
    TRAINING_META,
    checkpoint_dir_name,
)

__all__ = ["TrainingCallbacks", "TrainResult", "run_training"]

StopDecision = Literal["continue", "cancel", "pause"]
STOP_DECISIONS = get_args(StopDecision)


class TrainingCallbacks:
    """Hooks the loop calls; every default does nothing. Subclass and override what you need."""

    def on_start(self, info: dict) -> None:
        """Once, before the first step: total_steps, task, num_examples, truncated_examples,
        trainable_params, the resolved ``config`` and ``peft`` (no None/"auto" left), label_names, and
        memory_estimate (the pre-flight's device memory estimate in GB by part, or None)."""

    def on_step(self, metrics: dict) -> None:
        """After each optimizer step: step, total_steps, epoch (float), train_loss,
        train_mean_token_accuracy (accuracy for classification; for DPO the share of pairs whose chosen
        answer's reward is above the rejected one's), learning_rate, trained_tokens; for DPO also
        train_chosen_reward, train_rejected_reward and train_reward_margin (means over the batch's pairs). A
        reinforcement step reports train_loss, train_reward (the mean grade of its sampled answers), train_kl
        (the mean KL estimate to the starting model) and train_answer_tokens (the answers' mean length)
        instead of an accuracy."""

    def on_eval(self, metrics: dict) -> None:
        """After each evaluation: step, valid_loss, valid_mean_token_accuracy; for DPO also
        valid_chosen_reward, valid_rejected_reward and valid_reward_margin; for reinforcement only
        valid_reward (the mean grade of ``eval_samples`` answers per validation prompt)."""

    def on_checkpoint(self, step: int, path: Path, epoch_end: bool = False) -> None:
        """After checkpoint ``step-N`` is complete on disk (renamed into place). ``epoch_end``: it was taken
        because an epoch ended (one per epoch, as OpenAI lists them), not by ``checkpoint_every`` or a pause."""

    def should_stop(self) -> StopDecision:
        """Polled before every optimizer step, and between matrices while the bases are set up."""
        return "continue"

    def on_setup_progress(self, done: int, total: int) -> None:
        """While setting up: ``done`` of ``total`` adapted matrices have their bases (taken from the basis
        store or computed), one call per matrix."""


# How a run ended: every step done, or stopped early because the callbacks asked ("cancel", "pause").
EndedBy = Literal["completion", "cancel", "pause"]


@dataclass
class TrainResult:
    ended_by: EndedBy
    step: int
    total_steps: int
    trained_tokens: int
    metrics: dict = field(default_factory=dict)
    adapter_dir: Path | None = None  # the final servable adapter (on completion only)
    last_checkpoint: Path | None = None


@dataclass
class _Run:
    """Everything set up for one run; the loop reads it, never rebuilds it."""

    base_model_path: Path
    output_dir: Path
    task: str
    method: Method
    peft: PeftSpec  # resolved
    config: TrainConfig  # resolved
    label_names: list[str] | None
    head_modules: list[str]
    model: nn.Module
    tokenizer: object
    device: torch.device
    train: list[Encoded] = field(default_factory=list)
    valid: list[Encoded] = field(default_factory=list)
    truncated: int = 0
    truncated_valid: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    steps_per_epoch: int = 0
    param_groups: list[dict] = field(default_factory=list)
    auto_checkpointing: bool = False  # gradient checkpointing was left to the loop, which may turn it on
    memory_estimate: dict | None = None  # the pre-flight's, in GB (preflight.check_memory); None if skipped
    text_pair: bool | None = None  # a classifier trained on text pairs (serving takes only pairs); None: causal
    # "dpo": preference pairs (training/preference.py); "reinforcement": prompts (training/reinforcement.py)
    objective: str = "supervised"
    # DPO's reference log-probabilities of each pair's (chosen, rejected) answer: (N, 2) and (M, 2).
    reference_train: torch.Tensor | None = None
    reference_valid: torch.Tensor | None = None
    rollouts: reinforcement.RolloutSetup | None = None  # reinforcement's sampling, grading and reference
    start_from: Path | None = None  # the fine-tune this run continues (its adapter folder), None from the base
    bases: BasisStore | None = None


def run_training(
    base_model_path: str | Path,
    train_examples: list[dict],
    valid_examples: list[dict] | None,
    peft: PeftSpec,
    config: TrainConfig,
    output_dir: str | Path,
    callbacks: TrainingCallbacks | None = None,
    resume_from: str | Path | None = None,
    bases: BasisStore | None = None,
    reward: reinforcement.Reward | None = None,
    start_from: str | Path | None = None,
) -> TrainResult:
    """Train and write ``output_dir/final``; or stop early (cancel / pause) as the callbacks ask.

    With ``resume_from`` (a ``checkpoints/step-N`` folder written by an earlier call with the same
    arguments) the run continues from that step exactly: same batches, RNG, optimizer moments and schedule.
    With ``bases`` (a basis store, svfit_core/bases.py) SVFit takes each weight's SVD from it or computes and
    keeps it there, and its checkpoints and adapters name their bases instead of storing U and V.
    With ``config.world_size`` N > 1 this process becomes rank 0 of N and starts the others (which need
    ``bases`` to pickle); it alone calls ``callbacks`` and writes into ``output_dir``.
    Prompt data (messages awaiting the assistant's answer) trains by reinforcement and needs ``reward``, which
    grades sampled answers (``reinforcement.Reward``).
    With ``start_from`` (a servable adapter folder a run of the same method and spec wrote, on the same base)
    training continues that fine-tune: its weights are the starting point, and the reference of DPO and of
    reinforcement's KL term. The adapters written stay relative to the base, like the one started from.
    """
    callbacks = callbacks or TrainingCallbacks()
    peft.validate()
    config.validate()
    fmt, label_names = _check_data(train_examples, valid_examples, config.label_names)
    if fmt == "prompt":
        _check_reinforcement(config, reward)
    if start_from is not None:
        _check_start(Path(start_from), peft, task_for_format(fmt))
    state = load_training_state(Path(resume_from)) if resume_from is not None else None
    if config.world_size > 1 and not distributed.in_group():
        return distributed.launch(
            run_training, config.world_size, distributed.device_type(config.device, config.world_size), callbacks,
            base_model_path=base_model_path, train_examples=train_examples, valid_examples=valid_examples,
            peft=peft, config=config, output_dir=output_dir, resume_from=resume_from, bases=bases,
            reward=reward, start_from=start_from,
        )
    ranks = SOLO
    if config.world_size > 1:
        ranks = distributed.joined(config.world_size, config.device)
        config = replace(config, device=str(ranks.device))

    # Seed before the model loads: a classification head is initialised from torch's global RNG.
    _seed_everything(config.seed)
    try:
        run = _set_up_in_turn(ranks, lambda: _setup_model(
            Path(base_model_path), Path(output_dir), task_for_format(fmt), label_names, peft, config,
            resume_from if resume_from is not None else start_from, _objective(fmt),
            _setup_resources(bases, callbacks),
        ))
    except _StoppedDuringSetup as stop:
        if state is None:
            return TrainResult(stop.decision, step=0, total_steps=0, trained_tokens=0)
        return TrainResult(stop.decision, state.step, 0, state.trained_tokens, dict(state.metrics),
                           last_checkpoint=Path(resume_from))
    run.start_from, run.bases = (Path(start_from) if start_from is not None else None), bases
    _setup_data(run, fmt, train_examples, valid_examples or [])
    _plan_memory(run)
    optimizer = _setup_optimizer(run)
    ranks.copy_from_main([p for group in run.param_groups for p in group["params"]])
    step, epoch, batch_index, trained_tokens, metrics = 0, 0, 0, 0, {}
    if state is not None:
        _check_resume(run, state)
        restore_optimizer(optimizer, state.optimizer_tensors, state.optimizer_json)
        restore_rng(state.rng_tensors, state.rng_json)
        step, epoch, batch_index = state.step, state.epoch, state.batch_index
        trained_tokens, metrics = state.trained_tokens, dict(state.metrics)
    if run.objective == "dpo":  # after the resume check, which names a checkpoint of another kind of run
        _setup_reference(run, resume_from)
    if run.objective == "reinforcement":
        run.rollouts = _setup_rollouts(run, reward)

    callbacks.on_start(_start_info(run, optimizer, ranks, resumed_step=step if state else None))
    last_checkpoint = Path(resume_from) if resume_from is not None else None
    saved_step = step if state is not None else None  # the step whose checkpoint is already on disk
    batches = epoch_batches(len(run.train), run.config.batch_size, run.config.seed, epoch)

    def result(ended_by: EndedBy, adapter_dir: Path | None = None) -> TrainResult:
        return TrainResult(ended_by, step, run.total_steps, trained_tokens, dict(metrics), adapter_dir, last_checkpoint)

    def checkpoint(epoch_end: bool = False) -> Path | None:
        if not ranks.is_main:  # every rank holds the same σ and optimizer state; one writes them
            return None
        position = TrainingState(step, epoch, batch_index, run.config.seed, trained_tokens, run.total_steps,
                                 _run_identity(run), dict(metrics))
        path = _save_checkpoint(run, optimizer, position, epoch_end)
        callbacks.on_checkpoint(step, path, epoch_end=epoch_end)
        return path

    while step < run.total_steps:
        decision = ranks.decide(callbacks.should_stop(), STOP_DECISIONS)
        if decision == "cancel":
            return result("cancel")
        if decision == "pause":
            if saved_step != step:
                last_checkpoint, saved_step = checkpoint(), step
            return result("pause")

        apply_lr(optimizer, lr_multiplier(step, run.total_steps, run.warmup_steps, run.config.lr_scheduler))
        ranks.seed_step(run.config.seed, step)
        if run.objective == "reinforcement":
            step_metrics = _reinforcement_step(run, optimizer, batches[batch_index], step)
        else:
            step_metrics = _train_step(run, optimizer, batches[batch_index], ranks)
        step += 1
        trained_tokens += step_metrics["tokens"]

        # Advance the data position; a new epoch draws its own order from (seed, epoch).
        batch_index += 1
        epoch_end = batch_index == len(batches)
        if epoch_end:
            epoch, batch_index = epoch + 1, 0
            batches = epoch_batches(len(run.train), run.config.batch_size, run.config.seed, epoch)

        train = _named("train", step_metrics)
        metrics.update(train)
        callbacks.on_step({
            "step": step,
            "total_steps": run.total_steps,
            "epoch": epoch + batch_index / len(batches),
            **train,
            "learning_rate": optimizer.param_groups[0]["lr"],
            "trained_tokens": trained_tokens,
        })

        every_eval = run.config.eval_every
        if run.valid and ((every_eval and step % every_eval == 0) or step == run.total_steps):
            valid = _named("valid", _evaluate(run, ranks))
            metrics.update(valid)
            callbacks.on_eval({"step": step, **valid})

        # One checkpoint per epoch (the last one too: it is the final model with its training state), and
        # every `checkpoint_every` steps between them for crash recovery.
        every_ckpt = run.config.checkpoint_every
        if epoch_end or (every_ckpt and step % every_ckpt == 0):
            last_checkpoint, saved_step = checkpoint(epoch_end), step

    final = run.output_dir / FINAL_DIR
    if ranks.is_main:
        with atomic_dir(final) as part:
            _write_servable(run, part, step)
    return result("completion", adapter_dir=final)


def _named(split: str, measured: dict) -> dict:
    """A step's or an evaluation's means under the names the callbacks report them by."""
    if "reward" in measured:  # reinforcement: no accuracy, and an evaluation has no loss
        return {f"{split}_{name}": measured[name] for name in ("loss", "reward", "kl", "answer_tokens")
                if name in measured}
    named = {f"{split}_loss": measured["loss"], f"{split}_mean_token_accuracy": measured["accuracy"]}
    if "chosen_reward" in measured:
        named[f"{split}_chosen_reward"] = measured["chosen_reward"]
        named[f"{split}_rejected_reward"] = measured["rejected_reward"]
        named[f"{split}_reward_margin"] = measured["chosen_reward"] - measured["rejected_reward"]
    return named


# -- validation and seeding ---------------------------------------------------------------------------


def _check_data(
    train: list[dict], valid: list[dict] | None, given_names: list[str] | None
) -> tuple[str, list[str] | None]:
    """The data's format, and the label names of a classification task (given, or the integers seen)."""
    fmt = check_examples(train, "training data")
    if valid:
        valid_fmt = check_examples(valid, "validation data")
        if valid_fmt != fmt:
            raise DataError(f"validation data is {valid_fmt} but training data is {fmt}",
                            errors=[f"format mismatch: {valid_fmt} vs {fmt}"])
    if task_for_format(fmt) != "classification":
        return fmt, None
    labels = [ex["label"] for ex in train + list(valid or [])]
    if given_names is not None:
        out_of_range = sorted({label for label in labels if label >= len(given_names)})
        if out_of_range:
            raise DataError(
                f"labels {out_of_range} are out of range for {len(given_names)} label names",
                errors=[f"label {label} out of range" for label in out_of_range],
            )
        return fmt, list(given_names)
    num_labels = max(labels) + 1
    if num_labels < 2:
        raise DataError("classification needs at least two labels (0 and 1)", errors=["only label 0 present"])
    return fmt, [str(i) for i in range(num_labels)]


def _check_reinforcement(config: TrainConfig, reward: reinforcement.Reward | None) -> None:
    if reward is None:
        raise ConfigError("prompt data trains by reinforcement, which needs a reward function to grade the "
                          "sampled answers", code="reward_required")
    if config.world_size > 1:
        raise ConfigError("reinforcement runs in one process for now: set world_size to 1", code="not_supported")
    if config.max_seq_length <= config.max_completion_tokens:
        raise ConfigError(
            f"max_seq_length ({config.max_seq_length}) must exceed max_completion_tokens "
            f"({config.max_completion_tokens}): a prompt gets what the answer leaves", code="invalid_config",
        )


def _check_start(start_from: Path, peft: PeftSpec, task: str) -> None:
    """A fine-tune continues with its own method and task."""
    meta = read_training_meta(start_from)
    if meta.get("method") != peft.method or meta.get("task") != task:
        raise ConfigError(
            f"the fine-tune to continue was trained with {meta.get('method')} as a {meta.get('task')} model; "
            f"this run is {peft.method}, {task}", code="start_mismatch",
        )


def _objective(fmt: str) -> str:
    """What a data format trains with: preference pairs by DPO, prompts by reinforcement, the rest supervised."""
    return {"preference": "dpo", "prompt": "reinforcement"}.get(fmt, "supervised")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# -- setup ----------------------------------------------------------------------------------------------


def _pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _setup_model(
    base_model_path: Path,
    output_dir: Path,
    task: str,
    label_names: list[str] | None,
    peft: PeftSpec,
    config: TrainConfig,
    load_from: str | Path | None,
    objective: str,
    resources: SetupResources,
) -> _Run:
    """The model set up for training: the base with the method's fresh adapter, or with the adapter (and
    trained head) of ``load_from``, a checkpoint being resumed or a fine-tune being continued."""
    method = get_method(peft.method)
    id2label = dict(enumerate(label_names)) if label_names else None
    device = _pick_device(config.device)
    # Straight onto the device in the run's dtype (bf16 on most GPUs): no fp32 copy of the frozen base.
    dtype = base_dtype_for(base_model_path, config.base_dtype, device, bf16=config.bf16,
                           trains_base=peft.method == "full")
    resolved_config = replace(config.resolved(peft.method), device=str(device),
                              base_dtype=str(dtype).removeprefix("torch."))
    resolved_config.bf16 = _use_bf16(resolved_config, device)
    num_labels = len(label_names) if label_names else None
    # Before minutes of loading and SVDs: a job whose smallest step cannot fit fails here (preflight.py).
    memory_estimate = check_memory(base_model_path, task, num_labels, peft, resolved_config, device, objective)
    model, tokenizer = load_base_model(
        base_model_path, task, num_labels=num_labels, id2label=id2label, dtype=dtype, device=device,
    )
    if task == "classification":
        model.config.problem_type = "single_label_classification"
    head_modules = []
    if task == "classification":  # the head, with the backbone's pooler where the method counts it in
        head_modules = classification_modules(model, with_pooler=method.head_includes_pooler)
    for name in head_modules:  # trained: fp32 weights and Adam moments, computed in the base's dtype by autocast
        model.get_submodule(name).float()
    resolved_peft = peft.resolved()
    if config.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    model, groups = setup_method(
        model, resolved_peft, head_modules, task,
        lr=resolved_config.learning_rate, head_lr=resolved_config.head_learning_rate,
        weight_decay=resolved_config.weight_decay,
        checkpoint_dir=Path(load_from) if load_from is not None else None,
        resources=resources,
    )
    model.to(device)
    return _Run(base_model_path, output_dir, task, method, resolved_peft, resolved_config, label_names,
                head_modules, model, tokenizer, device, param_groups=groups, memory_estimate=memory_estimate)


class _StoppedDuringSetup(Exception):
    """The callbacks asked to cancel or pause while the bases were being set up."""

    def __init__(self, decision: EndedBy) -> None:
        super().__init__(decision)
        self.decision = decision


def _set_up_in_turn(ranks: Ranks, setup: Callable[[], _Run]) -> _Run:
    """``setup()`` on rank 0 first, then on the others once rank 0 says it finished: with a basis store rank 0
    computes and keeps every basis and the others read them, so each SVD runs once. A stop the callbacks ask
    for while rank 0 sets up (only rank 0 polls them) stops every rank."""
    if ranks.is_main:
        try:
            run = setup()
        except _StoppedDuringSetup as stop:
            ranks.decide(stop.decision, STOP_DECISIONS)
            raise
        ranks.decide("continue", STOP_DECISIONS)
        return run
    decision = ranks.decide("continue", STOP_DECISIONS)
    if decision != "continue":
        raise _StoppedDuringSetup(decision)
    return setup()


def _setup_resources(bases: BasisStore | None, callbacks: TrainingCallbacks) -> SetupResources:
    """The basis store, and a per-matrix hook that reports progress and stops between matrices when asked:
    on a large model the SVDs take minutes, and a cancel or pause must not wait for all of them."""

    def on_progress(done: int, total: int) -> None:
        callbacks.on_setup_progress(done, total)
        decision = callbacks.should_stop()
        if decision != "continue" and done < total:
            raise _StoppedDuringSetup(decision)

    return SetupResources(bases=bases, on_progress=on_progress)


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing needs no input that requires grad, which frozen embeddings lack.
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation


def _setup_data(run: _Run, fmt: str, train_examples: list[dict], valid_examples: list[dict]) -> None:
    limit = run.config.max_seq_length
    positions = max_positions(run.model)
    if positions is not None:
        limit = min(limit, positions)  # longer rows would index past the position embeddings
    # Segment (token type) embeddings exist only in BERT-style models; others must not receive the ids.
    token_types = bool(getattr(run.model.config, "type_vocab_size", 0))
    run.text_pair = fmt == "classification_pair" if run.task == "classification" else None
    run.objective = _objective(fmt)
    if run.objective == "reinforcement":
        if run.method.name not in REINFORCEMENT_METHODS:
            raise ConfigError(f"reinforcement trains with {', '.join(REINFORCEMENT_METHODS)}, not "
                              f"{run.method.name}", code="not_supported")
        limit -= run.config.max_completion_tokens  # a prompt gets what the sampled answer leaves
        if limit < 1:
            raise ConfigError(f"the model takes {positions} positions, no more than max_completion_tokens "
                              f"({run.config.max_completion_tokens})", code="invalid_config")
    run.train = [encode_example(ex, fmt, run.tokenizer, limit, token_types=token_types) for ex in train_examples]
    run.valid = [encode_example(ex, fmt, run.tokenizer, limit, token_types=token_types) for ex in valid_examples]
    run.truncated = sum(row.truncated for row in run.train)
    run.truncated_valid = sum(row.truncated for row in run.valid)
    run.steps_per_epoch = batches_per_epoch(len(run.train), run.config.batch_size)
    run.total_steps = run.config.n_epochs * run.steps_per_epoch
    if run.config.max_steps is not None:
        run.total_steps = min(run.total_steps, run.config.max_steps)
    run.warmup_steps = warmup_steps_for(run.total_steps, run.config.warmup_ratio)


# The methods whose starting model is the base with the adapter off, or (full) a copy kept frozen. PiSSA moves
# part of each weight into its adapter, so switching that off is not the starting model.
REINFORCEMENT_METHODS = ("svfit", "lora", "full")


def _setup_rollouts(run: _Run, reward: reinforcement.Reward) -> reinforcement.RolloutSetup:
    """Sampling, grading and the KL reference of a reinforcement run. The reference is the starting model: the
    base with the adapter switched off, but a frozen copy for full fine-tuning (the base, loaded a second time)
    and for a run continuing a fine-tune (that fine-tune, merged)."""
    config = run.config
    frozen = None
    if config.kl_coef > 0 and run.start_from is not None:
        frozen = load_trained_model(run.base_model_path, run.start_from, run.bases)[0].to(run.device)
    elif config.kl_coef > 0 and run.method.name == "full":
        frozen, _ = load_base_model(run.base_model_path, "causal", dtype=DTYPES[config.base_dtype],
                                    device=run.device)
    if frozen is not None:
        frozen.requires_grad_(False).eval()
    return reinforcement.RolloutSetup(
        model=run.model, tokenizer=run.tokenizer, device=run.device, autocast=lambda: _autocast(run),
        reward=reward, reference_logprobs=reinforcement.sequence_reference(run.model, frozen),
        stop_ids=eos_token_ids(transformers_model(run.model), run.tokenizer), seed=config.seed,
        samples_per_prompt=config.samples_per_prompt, eval_samples=config.eval_samples,
        max_completion_tokens=config.max_completion_tokens, temperature=config.sampling_temperature,
        kl_coef=config.kl_coef, clip_epsilon=config.clip_epsilon,
        max_tokens_per_micro_batch=config.max_tokens_per_micro_batch,
        accumulation_steps=config.gradient_accumulation_steps,
    )


def _setup_optimizer(run: _Run) -> torch.optim.Optimizer:
    # Each group carries its own lr and weight decay (σ: none; head: its own rate); see param_groups.py.
    return torch.optim.AdamW(run.param_groups, lr=run.config.learning_rate, betas=(0.9, 0.999), eps=1e-8)


def _run_identity(run: _Run) -> dict:
    """What must match for a checkpoint to continue this run exactly."""
    # Cadences and placement may change between the two halves of a run; the trajectory may not.
    trajectory = {k: v for k, v in run.config.to_dict().items()
                  if k not in ("eval_every", "checkpoint_every", "device", "gradient_checkpointing", "bf16",
                               "max_tokens_per_micro_batch", "base_dtype")}
    return {"method": run.method.name, "task": run.task, "objective": run.objective, "peft": run.peft.to_dict(),
            "config": trajectory,
            "label_names": run.label_names, "num_examples": len(run.train)}


def _check_resume(run: _Run, state: TrainingState) -> None:
    expected = _run_identity(run)
    # A checkpoint from before data parallelism does not name its world size: it ran in one process; one from
    # before the banded variant does not name its band: it trained σ only.
    # One from before DPO trained with the supervised objective, and its config names no beta.
    # One from before reinforcement names none of its settings.
    added = ("world_size", "dpo_beta", *_REINFORCEMENT_SETTINGS)
    saved = {"objective": "supervised", **state.run,
             "config": {**{name: getattr(TrainConfig, name) for name in added}, **state.run.get("config", {})}}
    if "peft" in state.run:
        saved["peft"] = {"band": 0, **state.run["peft"]}
    if saved != json.loads(json.dumps(expected)) or state.total_steps != run.total_steps:
        differing = sorted(k for k in expected if saved.get(k) != json.loads(json.dumps(expected[k])))
        raise ConfigError(
            f"the checkpoint belongs to a run with other settings ({', '.join(differing) or 'total_steps'})",
            code="checkpoint_mismatch",
        )


_REINFORCEMENT_SETTINGS = ("samples_per_prompt", "max_completion_tokens", "sampling_temperature", "kl_coef",
                           "clip_epsilon", "eval_samples")


def _start_info(run: _Run, optimizer: torch.optim.Optimizer, ranks: Ranks, resumed_step: int | None) -> dict:
    return {
        "total_steps": run.total_steps,
        "task": run.task,
        "method": run.method.name,
        "objective": run.objective,
        "num_examples": len(run.train),
        "num_valid_examples": len(run.valid),
        "truncated_examples": run.truncated,
        "truncated_valid_examples": run.truncated_valid,
        "trainable_params": count_trainable(optimizer.param_groups),
        "config": run.config.to_dict(),
        "peft": run.peft.to_dict(),
        "label_names": run.label_names,
        "device": str(run.device),
        "resumed_from_step": resumed_step,
        "tokens_per_micro_batch": run.config.max_tokens_per_micro_batch,
        "micro_batches_per_step": _micro_batches_per_step(run, ranks),
        "memory_estimate": run.memory_estimate,
    }


# -- fitting a step in device memory --------------------------------------------------------------------------


def _plan_memory(run: _Run) -> None:
    """Resolve the config's automatic ``gradient_checkpointing`` and ``max_tokens_per_micro_batch`` (see
    memory.py), now that the model is on its device and the data's longest row is known."""
    config = run.config
    adapter_width = 0
    if run.method.name == "svfit":  # Σ r is the number of σ; LoRA's ranks are too small to count
        adapter_width = count_trainable([g for g in run.param_groups if g["name"] == run.method.body_name])
    param_bytes = next(p.element_size() for p in run.model.parameters() if p.is_floating_point())
    plan = plan_memory(
        run.model, run.device,
        trainable=[p for group in run.param_groups for p in group["params"]],
        compute_bytes=2 if config.bf16 else param_bytes,
        adapter_width=adapter_width,
        longest_row=_rows_per_example(run) * _longest_row(run),
        max_tokens=config.max_tokens_per_micro_batch,
        checkpointing=config.gradient_checkpointing,
    )
    run.auto_checkpointing = config.gradient_checkpointing is None
    if run.auto_checkpointing and plan.gradient_checkpointing:
        _enable_gradient_checkpointing(transformers_model(run.model))
    run.config = replace(config, gradient_checkpointing=plan.gradient_checkpointing,
                         max_tokens_per_micro_batch=plan.tokens_per_micro_batch)


def _rows_per_example(run: _Run) -> int:
    # A preference pair runs as its two answers' rows, a prompt as its group of sampled answers' rows.
    return {"dpo": 2, "reinforcement": run.config.samples_per_prompt}.get(run.objective, 1)


def _longest_row(run: _Run) -> int:
    """The longest row a step may run: a prompt's grows by the answer sampled after it."""
    longest = max(len(row) for row in run.train)
    return longest + run.config.max_completion_tokens if run.objective == "reinforcement" else longest


def _micro_batches(run: _Run, batch: list[int], examples: list[Encoded] | list[EncodedPreference]) -> list[list[int]]:
    # The token budget is for padded rows; a pair's length is its longer row, and it brings two.
    return micro_batches(batch, examples, run.config.gradient_accumulation_steps,
                         max(1, run.config.max_tokens_per_micro_batch // _rows_per_example(run)))


def _micro_batches_per_step(run: _Run, ranks: Ranks) -> int:
    """The most micro-batches a step of the first epoch runs on this rank at the planned budget."""
    batches = epoch_batches(len(run.train), run.config.batch_size, run.config.seed, 0)
    return max(len(_micro_batches(run, ranks.share(batch), run.train)) for batch in batches)


def _shrink_after_oom(run: _Run, failed: list[int]) -> None:
    """Make the micro-batch that ran out of device memory smaller, for its retry and the rest of the run:
    the budget becomes half its padded size; a single row gets gradient checkpointing when the loop may
    turn it on. A single row that cannot shrink further ends the run."""
    width = max(len(run.train[i]) for i in failed)
    if len(failed) > 1:
        run.config.max_tokens_per_micro_batch = _rows_per_example(run) * len(failed) * width // 2
    elif run.auto_checkpointing and not run.config.gradient_checkpointing:
        _enable_gradient_checkpointing(transformers_model(run.model))
        run.config.gradient_checkpointing = True
    else:
        checkpointing = " with gradient checkpointing" if run.config.gradient_checkpointing else ""
        raise DeviceMemoryError(
            f"one training example of {width} tokens does not fit in device memory even alone{checkpointing}: "
            f"lower max_seq_length (now {run.config.max_seq_length}; {width // 2} would halve this example's "
            "activations), adapt fewer target modules, or use a smaller rank",
            tokens=width,
        )


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generators a step draws from (dropout): the CPU one and, on CUDA, the device's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


# -- one step ---------------------------------------------------------------------------------------------


def _use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if config.base_dtype != "float32":  # a half-precision base computes in its own dtype
        return config.base_dtype == "bfloat16"
    if config.bf16 is not None:
        return config.bf16
    # By default only on CUDA: CPU runs stay fp32, where resumed runs are bit-identical.
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _autocast(run: _Run):
    # Autocast computes in bf16 (or a half-precision base's own dtype) but keeps the trained tensors (σ,
    # adapters, head) and their Adam moments in fp32, which small updates to σ need; on a half-precision
    # base it is also what lets an fp32 head take the base's activations.
    dtype = torch.bfloat16 if run.config.bf16 else DTYPES[run.config.base_dtype]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=dtype)


def _loss_step(
    run: _Run, batch: dict[str, torch.Tensor], reference: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed loss over the batch's targets, the number of correct predictions (see loss.py), and for DPO
    the summed rewards (``preference.REWARD_METRICS``; None otherwise). A DPO batch is ``collate_pairs``'s,
    ``reference`` its pairs' reference log-probabilities.

    Sums, not means: the caller divides by the targets of the whole optimizer batch, so micro-batches of
    different sizes weigh each target equally.
    """
    with _autocast(run):
        if run.objective == "dpo":
            return preference.preference_loss(run.model, batch, reference, run.config.dpo_beta)
        if run.task == "causal":
            return (*causal_loss(run.model, batch), None)
        return (*classification_loss(run.model, batch), None)


def _micro_batch_inputs(
    run: _Run, micro: list[int], examples: list, reference: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The padded tensors of the examples ``micro`` indexes, on the device, and their reference rows."""
    rows = [examples[i] for i in micro]
    if run.objective == "dpo":
        batch = preference.collate_pairs(rows, run.tokenizer.pad_token_id)
        return {k: v.to(run.device) for k, v in batch.items()}, reference[torch.tensor(micro, dtype=torch.long)]
    return {k: v.to(run.device) for k, v in collate(rows, run.tokenizer.pad_token_id).items()}, None


def _tokens(rows: list) -> int:
    return sum(len(r.chosen) + len(r.rejected) if isinstance(r, EncodedPreference) else len(r) for r in rows)


def _accumulate_gradients(
    run: _Run, batch: list[int], targets: int
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None, list[int] | None]:
    """Forward and backward of each micro-batch of ``batch``: ((loss sum, correct, reward sums, tokens),
    None), or (None, the micro-batch that ran out of device memory) with the gradients part accumulated."""
    loss_total = torch.zeros((), device=run.device)
    correct_total = torch.zeros((), dtype=torch.long, device=run.device)
    rewards_total = torch.zeros(len(preference.REWARD_METRICS), device=run.device)
    tokens = 0
    for micro in _micro_batches(run, batch, run.train):
        inputs, reference = _micro_batch_inputs(run, micro, run.train, run.reference_train)
        try:
            loss_sum, correct, rewards = _loss_step(run, inputs, reference)
            (loss_sum / targets).backward()
        except torch.OutOfMemoryError:
            # Returning ends this frame and the exception, and with them every activation of the attempt;
            # a retry from inside the handler would run with all of them still alive.
            return None, micro
        loss_total += loss_sum.detach()
        correct_total += correct
        if rewards is not None:
            rewards_total += rewards
        tokens += _tokens([run.train[i] for i in micro])
    return (loss_total, correct_total, rewards_total, tokens), None


def _share_gradients(
    run: _Run, optimizer: torch.optim.Optimizer, share: list[int], targets: int
) -> tuple[float, ...]:
    """Accumulate the gradients of ``share`` (this rank's example indices of a step) in micro-batches under
    the token budget -> (loss sum, correct predictions, tokens, *reward sums).

    Running out of device memory restarts the share with smaller micro-batches (``_shrink_after_oom``): the
    partial gradients are dropped and the RNG rewound, so the retry computes what the step would have
    computed with the smaller budget from the start.
    """
    rng = _rng_state(run.device)
    while True:
        sums, failed = _accumulate_gradients(run, share, targets)
        if failed is None:
            break
        optimizer.zero_grad(set_to_none=True)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the failed attempt's blocks back: a fragmented cache OOMs again
        _shrink_after_oom(run, failed)
        _set_rng_state(run.device, rng)
    loss_total, correct_total, rewards_total, tokens = sums
    # .tolist() syncs with the GPU once per step, after the backward passes are queued.
    return (loss_total.item(), int(correct_total.item()), tokens, *rewards_total.tolist())


def _means(run: _Run, sums: list[float], targets: int) -> dict:
    """Per-target means of a step's or an evaluation's sums (loss, correct, tokens, *reward sums)."""
    loss_total, correct_total, _tokens_seen, *rewards = sums
    means = {"loss": loss_total / targets, "accuracy": correct_total / targets}
    if run.objective == "dpo":
        means.update({name: value / targets for name, value in zip(preference.REWARD_METRICS, rewards, strict=True)})
    return means


def _reinforcement_step(run: _Run, optimizer: torch.optim.Optimizer, batch: list[int], step: int) -> dict:
    """One optimizer step over the prompts ``batch`` indexes: sample and grade each one's group of answers,
    then one update on the clipped, KL-held policy loss (reinforcement.py)."""
    run.model.train()
    answers = len(batch) * run.config.samples_per_prompt
    sums = reinforcement.reinforcement_gradients(run.rollouts, [run.train[i] for i in batch], batch, step, answers)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if run.config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, run.config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    means = {name: sums[name] / answers for name in ("loss", "reward", "kl", "answer_tokens")}
    return {**means, "tokens": sums["tokens"]}


def _train_step(run: _Run, optimizer: torch.optim.Optimizer, batch: list[int], ranks: Ranks) -> dict:
    """One optimizer step over ``batch`` (example indices): each rank accumulates the gradients of its share,
    the ranks sum them, and every rank applies the same update."""
    run.model.train()
    # Every rank divides by the targets of the whole batch, which it knows: the gradients summed over the
    # ranks are then exactly what one process computes for the batch.
    targets = max(1, batch_targets([run.train[i] for i in batch]))
    try:
        sums, failure = _share_gradients(run, optimizer, ranks.share(batch), targets), None
    except DeviceMemoryError as exc:
        sums, failure = (0.0, 0, 0, *[0.0] * len(preference.REWARD_METRICS)), exc  # raised in sum_step
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums = ranks.sum_step(params, sums, failure)
    if run.config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, run.config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**_means(run, sums, targets), "tokens": int(sums[2])}


@torch.no_grad()
def _evaluate(run: _Run, ranks: Ranks) -> dict:
    """The validation loss and accuracy (and DPO's rewards) over all of ``run.valid``, each rank evaluating
    its share."""
    if run.objective == "reinforcement":  # one process only (_check_reinforcement)
        return reinforcement.evaluate_prompts(run.rollouts, run.valid, run.config.batch_size)
    run.model.eval()
    sums = [0.0, 0, 0, *[0.0] * len(preference.REWARD_METRICS)]
    share = ranks.share(list(range(len(run.valid))))
    for start in range(0, len(share), run.config.batch_size):
        batch = share[start : start + run.config.batch_size]
        for micro in _micro_batches(run, batch, run.valid):
            inputs, reference = _micro_batch_inputs(run, micro, run.valid, run.reference_valid)
            loss_sum, correct, rewards = _loss_step(run, inputs, reference)
            sums[0] += loss_sum.item()
            sums[1] += int(correct)
            if rewards is not None:
                for i, value in enumerate(rewards.tolist()):
                    sums[3 + i] += value
    run.model.train()
    sums = ranks.sum(sums)
    return _means(run, sums, max(1, batch_targets(run.valid)))


def _setup_reference(run: _Run, resume_from: str | Path | None) -> None:
    """DPO's reference log-probabilities: the resumed checkpoint's, or computed now by the model as training
    starts from it (the reference, see preference.py). Every rank computes all of them: one forward pass over
    the data, a fraction of one epoch's cost."""
    if resume_from is not None:
        saved = preference.load_reference(Path(resume_from))
        if saved is None:
            raise ConfigError("the checkpoint holds no DPO reference log-probabilities", code="checkpoint_mismatch")
        run.reference_train, run.reference_valid = saved
        return
    # Micro-batches as training forms them (the first epoch's order does not matter: each pair is scored alone).
    def score(examples: list[EncodedPreference]) -> torch.Tensor:
        micro = _micro_batches(run, list(range(len(examples))), examples)
        return preference.reference_logprobs(run.model, examples, micro, run.tokenizer.pad_token_id, run.device,
                                             lambda: _autocast(run))

    run.reference_train, run.reference_valid = score(run.train), score(run.valid)


# -- writing adapters -------------------------------------------------------------------------------------


def training_meta(run: _Run, step: int, epoch_end: bool = False) -> dict:
    return {
        "format_version": META_FORMAT_VERSION,
        "method": run.method.name,
        "task": run.task,
        "objective": run.objective,
        "label_names": run.label_names,
        "text_pair": run.text_pair,
        "base_model_path": str(run.base_model_path.resolve()),
        "base_model_name": run.base_model_path.resolve().name,
        "step": step,
        "epoch_end": epoch_end,
        "peft": run.peft.to_dict(),
        "max_seq_length": run.config.max_seq_length,
    }


def _write_servable(run: _Run, folder: Path, step: int, epoch_end: bool = False) -> None:
    run.method.save(run.model, folder)
    (folder / TRAINING_META).write_text(json.dumps(training_meta(run, step, epoch_end), indent=2))


def _save_checkpoint(
    run: _Run, optimizer: torch.optim.Optimizer, position: TrainingState, epoch_end: bool
) -> Path:
    final = run.output_dir / CHECKPOINTS_DIR / checkpoint_dir_name(position.step)
    with atomic_dir(final) as part:
        _write_servable(run, part, position.step, epoch_end)
        run.method.save_resume_state(run.model, part)
        if run.objective == "dpo":
            preference.save_reference(part, run.reference_train, run.reference_valid)
        position.optimizer_tensors, position.optimizer_json = flatten_optimizer(optimizer)
        position.rng_tensors, position.rng_json = capture_rng()
        save_training_state(part, position)
    return final
