"""What a training run is asked to do: ``PeftSpec`` (which parameters train, and how) and ``TrainConfig`` (the
optimisation), their validation, and the defaults that fill every ``None`` before the run starts.

Validation happens before any model is loaded, so a bad request fails in milliseconds with a
``HyperparameterError`` naming the offending field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from svfit_core.config import MAX_BAND
from svfit_core.errors import ConfigError

METHODS = ("svfit", "lora", "pissa", "full", "head_only")
SCHEDULERS = ("linear", "cosine")
ENERGY_MEASURES = ("squared", "linear")
BASE_DTYPES = ("auto", "float32", "bfloat16", "float16")
# What a data-parallel run may name as its device: a type, never one device (rank i takes cuda:i); None is CUDA.
DATA_PARALLEL_DEVICES = (None, "cuda", "cpu")

# Default learning rates per method. σ needs one to two orders of magnitude more than LoRA's factors: a step
# of Δσ moves a whole singular direction of a weight whose singular values are O(1–10), where LoRA's B starts
# at zero. SVFT's published recipe uses 5e-2 to 8e-2 on σ over long GLUE runs. Measured here (CPU, seed 0,
# q/v targets, r = k), validation loss after a short job: SmolLM2-135M chat SFT (starting loss 4.9), 24 steps
# of 8: 0.16 at 5e-2, 0.12 at 1e-1 (LoRA r=8 at 5e-4: 2.18); MiniLM-L6 sentiment, 32 steps of 16, held-out
# adjectives (starting 0.69): 0.64 at 1e-2, 0.30 at 5e-2, 0.07 at 1e-1 (LoRA 5e-4: 0.69), all stable. 5e-2 learns well in short jobs and stays inside the recipe for long ones.
# LoRA (5e-4) and full fine-tuning (5e-5) take the rates common in their own recipes.
DEFAULT_LEARNING_RATE = {"svfit": 5e-2, "lora": 5e-4, "pissa": 5e-4, "full": 5e-5, "head_only": 5e-3}
# A freshly initialised classification head learns at its own rate: the SVFT recipe (6e-3) for σ-based
# training; for the others the method's rate, which is what their usual recipes use for the whole model.
DEFAULT_HEAD_LEARNING_RATE = {"svfit": 5e-3, "lora": 5e-4, "pissa": 5e-4, "full": 5e-5}
# Which matrices the adapter methods adapt, and at what rank, when a spec does not say: every linear layer of
# the transformer blocks, for SVFit the top 256 singular values of each (r = k where k < 256) and for LoRA
# rank 16. Measured against q/v-only and against SVFit with every singular value on the service's quality
# suites (benchmarks/README.md, "Defaults"): all-linear beats q/v for both methods; r = 256 keeps an SVFit step
# within 1.1x of a LoRA r=16 step at Llama-8B shapes, where r = k would cost 2.4x (SVFIT.md, cost model).
DEFAULT_TARGET_MODULES = "all-linear"
DEFAULT_SVFIT_RANK = 256
DEFAULT_LORA_RANK = 16
# Counts (ranks, steps, lengths) end up in tensors' index types and the service's 32-bit columns.
MAX_INT32 = 2**31 - 1


class HyperparameterError(ConfigError):
    """A training option is out of range or unknown. ``param`` names it (``"rank"``, ``"learning_rate"``)."""

    code = "invalid_hyperparameter"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code or "invalid_hyperparameter")
        self.param = param


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_INT32


def finite_number(value: Any) -> bool:
    """An int or float (a bool is neither here) that is a finite float: not inf or NaN, and not an integer
    too large for a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # math.isfinite(10**400) overflows converting to float
        return False


def shown(value: Any) -> str:
    """A value as an error message quotes it: a hostile 4,000-digit number or a huge list is cut short."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class PeftSpec:
    """Which parameters train. ``rank``/``energy`` follow ``SVFitConfig`` for svfit (neither: r =
    ``DEFAULT_SVFIT_RANK``, clamped to k per matrix) and ``rank`` is LoRA's r for lora/pissa (default
    ``DEFAULT_LORA_RANK``). ``target_modules`` None means ``DEFAULT_TARGET_MODULES`` (every linear layer of
    the transformer blocks). ``lora_alpha`` None means 2·rank. ``band`` (svfit only) d > 0 also trains d off-diagonals on
    each side of the r×r coupling (SVFT's banded variant, ``SVFitConfig.band``); 0 is plain SVFit."""

    method: Literal["svfit", "lora", "pissa", "full", "head_only"] = "svfit"
    rank: int | None = None
    energy: float | None = None
    energy_measure: Literal["squared", "linear"] = "squared"
    target_modules: list[str] | str | None = None
    lora_alpha: float | None = None
    train_bottom: bool = False
    band: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise HyperparameterError(
                f"unknown method {shown(self.method)} (expected one of {METHODS})", param="method"
            )
        if self.rank is not None and not _positive_int(self.rank):
            raise HyperparameterError(f"rank must be an integer from 1 to 2^31-1, got {shown(self.rank)}", param="rank")
        if self.energy is not None and not (finite_number(self.energy) and 0.0 < self.energy <= 1.0):
            raise HyperparameterError(f"energy must be in (0, 1], got {shown(self.energy)}", param="energy")
        if self.energy_measure not in ENERGY_MEASURES:
            raise HyperparameterError(
                f"energy_measure must be one of {ENERGY_MEASURES}, got {shown(self.energy_measure)}",
                param="energy_measure",
            )
        if self.energy is not None and self.method != "svfit":
            raise HyperparameterError("energy applies to the svfit method only", param="energy")
        if isinstance(self.band, bool) or not isinstance(self.band, int) or not 0 <= self.band <= MAX_BAND:
            raise HyperparameterError(f"band must be an integer from 0 to {MAX_BAND}, got {shown(self.band)}",
                                      param="band")
        if self.band and self.method != "svfit":
            raise HyperparameterError("band applies to the svfit method only", param="band")
        if self.lora_alpha is not None and not (finite_number(self.lora_alpha) and self.lora_alpha > 0):
            raise HyperparameterError(
                f"lora_alpha must be a finite number > 0, got {shown(self.lora_alpha)}", param="lora_alpha"
            )
        if self.target_modules is not None and not (
            (isinstance(self.target_modules, str) and self.target_modules)
            or (isinstance(self.target_modules, list) and self.target_modules
                and all(isinstance(t, str) and t for t in self.target_modules))
        ):
            raise HyperparameterError(
                f"target_modules must be a non-empty list of names or a string, got {shown(self.target_modules)}",
                param="target_modules",
            )
        if not isinstance(self.train_bottom, bool):
            raise HyperparameterError(f"train_bottom must be a boolean, got {shown(self.train_bottom)}",
                                      param="train_bottom")

    def resolved(self, default_targets: list[str] | str | None = DEFAULT_TARGET_MODULES) -> PeftSpec:
        """A copy with the method's defaults filled in; ``default_targets`` replaces the default target rule."""
        spec = replace(self)
        if spec.method == "svfit" and spec.rank is None and spec.energy is None:
            spec.rank = DEFAULT_SVFIT_RANK
        if spec.method in ("lora", "pissa"):
            spec.rank = spec.rank or DEFAULT_LORA_RANK
            spec.lora_alpha = spec.lora_alpha if spec.lora_alpha is not None else float(2 * spec.rank)
        if spec.method in ("svfit", "lora", "pissa") and spec.target_modules is None:
            spec.target_modules = default_targets
        if isinstance(spec.target_modules, list):
            spec.target_modules = list(spec.target_modules)
        return spec

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftSpec:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class TrainConfig:
    """How to optimise.

    ``batch_size`` is the number of examples per optimizer step (OpenAI's meaning); with
    ``gradient_accumulation_steps`` = g each step runs at least g micro-batches of about batch_size / g
    examples, and each is split further until its padded token count is at most
    ``max_tokens_per_micro_batch`` (None: chosen from free device memory, see ``training.memory``). Both
    trade memory for time without changing the result. ``gradient_checkpointing`` None turns it on only
    when one example of the longest length would not fit otherwise (never on CPU).
    ``learning_rate`` / ``head_learning_rate`` None take the method's default. ``weight_decay`` never
    applies to σ. ``eval_every`` / ``checkpoint_every`` count optimizer steps. ``label_names`` names
    classification labels 0..n-1 (default: the integers). ``world_size`` N > 1 trains data-parallel in N
    processes of this machine, one device each (``cuda:0`` … ``cuda:N-1``, or CPU processes with
    ``device="cpu"``), each taking its share of every batch; the result is the one-process run's up to
    floating-point summation order and dropout draws (see ``training.distributed``).
    """

    n_epochs: int = 3
    batch_size: int = 8
    learning_rate: float | None = None
    head_learning_rate: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    lr_scheduler: Literal["linear", "cosine"] = "linear"
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    max_seq_length: int = 512
    eval_every: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    gradient_checkpointing: bool | None = None
    max_tokens_per_micro_batch: int | None = None
    max_steps: int | None = None
    label_names: list[str] | None = None
    device: str | None = None  # None: CUDA when available, else CPU
    bf16: bool | None = None  # bf16 autocast; None: on for a CUDA device that supports it, off on CPU
    # The dtype the frozen base is held in (rule: ``loading.base_dtype_for``). "auto": float32 on CPU, with
    # bf16 false, or for full fine-tuning; on CUDA the checkpoint's own bf16/fp16, and bf16 for an fp32 one
    # where the device computes bf16 natively. A half-precision base computes in its own dtype (σ and a head
    # stay fp32 under autocast to it), so "bfloat16" needs bf16 unset or true, "float16" unset or false.
    base_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    world_size: int = 1
    # DPO's beta: how far the policy may move from the reference per unit of preference. Used only when the
    # training data is in the preference format (the loss is then DPO's, training/preference.py).
    dpo_beta: float = 0.1
    # Reinforcement (training/reinforcement.py), used only when the training data is prompts: each step samples
    # ``samples_per_prompt`` answers of at most ``max_completion_tokens`` to each of its prompts at
    # ``sampling_temperature``, and each evaluation ``eval_samples`` answers per validation prompt. The loss
    # holds the policy within ``clip_epsilon`` of the sampling policy (PPO's clipped ratio) and pays ``kl_coef``
    # times an estimate of the KL divergence to the starting model.
    samples_per_prompt: int = 4
    max_completion_tokens: int = 256
    sampling_temperature: float = 1.0
    kl_coef: float = 0.04
    clip_epsilon: float = 0.2
    eval_samples: int = 1

    def validate(self) -> None:
        for name in ("n_epochs", "batch_size", "gradient_accumulation_steps", "max_seq_length", "world_size",
                     "max_completion_tokens", "eval_samples"):
            if not _positive_int(getattr(self, name)):
                raise HyperparameterError(
                    f"{name} must be an integer from 1 to 2^31-1, got {shown(getattr(self, name))}", param=name
                )
        for name in ("eval_every", "checkpoint_every", "max_steps", "max_tokens_per_micro_batch"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise HyperparameterError(
                    f"{name} must be an integer from 1 to 2^31-1 or None, got {shown(value)}", param=name
                )
        for name in ("learning_rate", "head_learning_rate"):
            value = getattr(self, name)
            if value is not None and not (finite_number(value) and value > 0):
                raise HyperparameterError(f"{name} must be a finite number > 0, got {shown(value)}", param=name)
        if not (finite_number(self.weight_decay) and self.weight_decay >= 0):
            raise HyperparameterError(
                f"weight_decay must be a finite number ≥ 0, got {shown(self.weight_decay)}", param="weight_decay"
            )
        if not (finite_number(self.dpo_beta) and self.dpo_beta > 0):
            raise HyperparameterError(f"dpo_beta must be a finite number > 0, got {shown(self.dpo_beta)}",
                                      param="dpo_beta")
        if not (_positive_int(self.samples_per_prompt) and self.samples_per_prompt >= 2):
            raise HyperparameterError(
                "samples_per_prompt must be an integer ≥ 2 (advantages compare the answers to one prompt), got "
                f"{shown(self.samples_per_prompt)}", param="samples_per_prompt",
            )
        for name, low_open in (("sampling_temperature", True), ("kl_coef", False), ("clip_epsilon", True)):
            value = getattr(self, name)
            if not (finite_number(value) and (value > 0 if low_open else value >= 0)):
                bound = "> 0" if low_open else "≥ 0"
                raise HyperparameterError(f"{name} must be a finite number {bound}, got {shown(value)}", param=name)
        if not (finite_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise HyperparameterError(f"warmup_ratio must be in [0, 1), got {shown(self.warmup_ratio)}",
                                      param="warmup_ratio")
        if self.bf16 not in (None, True, False):
            raise HyperparameterError(f"bf16 must be true, false or null, got {shown(self.bf16)}", param="bf16")
        if self.base_dtype not in BASE_DTYPES:
            raise HyperparameterError(
                f"base_dtype must be one of {BASE_DTYPES}, got {shown(self.base_dtype)}", param="base_dtype"
            )
        if (self.base_dtype, self.bf16) in (("bfloat16", False), ("float16", True)):
            raise HyperparameterError(
                f"a {self.base_dtype} base computes in {self.base_dtype}, so bf16 cannot be {self.bf16}", param="bf16"
            )
        if self.world_size != 1 and self.device not in DATA_PARALLEL_DEVICES:
            raise HyperparameterError(
                f"a run of world_size {self.world_size} places each process itself: device must be one of "
                f"{DATA_PARALLEL_DEVICES}, got {shown(self.device)}", param="device"
            )
        if self.gradient_checkpointing is not None and not isinstance(self.gradient_checkpointing, bool):
            raise HyperparameterError(
                f"gradient_checkpointing must be true, false or null, got {shown(self.gradient_checkpointing)}",
                param="gradient_checkpointing",
            )
        if self.lr_scheduler not in SCHEDULERS:
            raise HyperparameterError(
                f"lr_scheduler must be one of {SCHEDULERS}, got {shown(self.lr_scheduler)}", param="lr_scheduler"
            )
        if self.max_grad_norm is not None and not (finite_number(self.max_grad_norm) and self.max_grad_norm > 0):
            raise HyperparameterError(
                f"max_grad_norm must be a finite number > 0 or None, got {shown(self.max_grad_norm)}",
                param="max_grad_norm",
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise HyperparameterError(f"seed must be a non-negative integer, got {shown(self.seed)}", param="seed")
        if self.label_names is not None and not (
            isinstance(self.label_names, list) and self.label_names
            and all(isinstance(n, str) and n for n in self.label_names)
            and len(set(self.label_names)) == len(self.label_names)
        ):
            raise HyperparameterError("label_names must be a non-empty list of distinct strings", param="label_names")

    def resolved(self, method: str) -> TrainConfig:
        """A copy with the method's learning rates filled in. For head_only the head *is* the method, so
        an explicit ``learning_rate`` applies to it."""
        lr = self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[method]
        if self.head_learning_rate is not None:
            head_lr = self.head_learning_rate
        else:
            head_lr = lr if method == "head_only" else DEFAULT_HEAD_LEARNING_RATE[method]
        return replace(
            self,
            learning_rate=lr,
            head_learning_rate=head_lr,
            label_names=list(self.label_names) if self.label_names is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
