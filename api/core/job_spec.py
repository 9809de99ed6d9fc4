"""The job-spec contract, both ways: a creation request's `peft` and hyperparameters become the spec stored on
the job, and a stored spec becomes the training library's `PeftSpec` and `TrainConfig`.

Stored in `jobs.peft` (and echoed by the job object): {"type": "svfit", "rank", "energy", "target_modules"},
{"type": "lora", "rank", "alpha", "target_modules"} or {"type": "full"}, plus the PEFT_OPTIONS the request set.
Stored in `jobs.hyperparameters`: {"n_epochs", "batch_size", "learning_rate_multiplier", "learning_rate"}.

Every "auto" is decided at creation, so the job object echoes exactly what will run. Values are judged by the
library's own validators, run here on the spec the worker will build, and a bad one is an `InvalidParameter`
naming the request's field. This module checks only what the library never sees: the request's JSON shape
and the service's own bounds on epochs, batch size and the learning-rate multiplier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from api.core.errors import InvalidParameter
from svfit_core.training.run_config import DEFAULT_LEARNING_RATE, HyperparameterError, PeftSpec, TrainConfig
from svfit_core.training.run_config import finite_number, shown

# The methods this service offers (the library also has pissa and head_only).
PEFT_TYPES = ("svfit", "lora", "full")

# Training options a request may add to `peft`, stored as given: the first three are PeftSpec's (`band`: SVFT's
# banded variant, svfit only), the rest TrainConfig's (under the library's name where it has another,
# LIBRARY_NAMES). Any other key of the request's `peft` is dropped.
SPEC_OPTIONS = ("energy_measure", "train_bottom", "band")
TRAIN_OPTIONS = (
    "max_seq_length",
    "checkpoint_every",
    "eval_every",
    "max_steps",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "warmup_ratio",
    "weight_decay",
    "head_learning_rate",
    "lr_scheduler",
    "gpus",
)
PEFT_OPTIONS = SPEC_OPTIONS + TRAIN_OPTIONS
# A request counts GPUs; the library counts processes (one device each), which on CPU are not GPUs.
LIBRARY_NAMES = {"gpus": "world_size"}
# JSON has one number type: a whole 4.0 in these is the integer 4 (as for n_epochs), before the library's
# integer rules see it.
_WHOLE_NUMBERS = (
    "rank", "band", "max_seq_length", "checkpoint_every", "eval_every", "max_steps", "gradient_accumulation_steps",
    "gpus",
)

N_EPOCHS_BOUNDS = (1, 50)
BATCH_SIZE_BOUNDS = (1, 256)

# OpenAI's rule for `n_epochs: "auto"`: aim at 3 epochs, but see at least 100 and at most 25,000 examples.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MAX_AUTO_EPOCHS = 25

HYPERPARAMETER_NAMES = ("n_epochs", "batch_size", "learning_rate_multiplier")


def auto_n_epochs(n_examples: int) -> int:
    n_examples = max(1, n_examples)
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    """About 0.2% of the data set (OpenAI's rule of thumb), rounded to a power of two.

    Never below 8 (or the whole set, when smaller): a batch of one or two makes a noisy, slow run on the
    small data sets this service is mostly given.
    """
    target = max(1.0, n_examples * 0.002)
    power_of_two = 2 ** round(math.log2(target))
    floor = min(8, max(1, n_examples))
    return int(min(BATCH_SIZE_BOUNDS[1], max(floor, power_of_two)))


# --- request -> stored ---------------------------------------------------------------------------------


def resolve_request(
    requested_peft: Mapping[str, Any] | None,
    requested_hyperparameters: Mapping[str, Any] | None,
    *,
    n_examples: int,
    param_prefix: str = "hyperparameters",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `peft` and `hyperparameters` a new job stores. `param_prefix` is where the request put its
    hyperparameters (`hyperparameters` or `method.supervised.hyperparameters`), for naming a bad one."""
    peft = _requested_peft(dict(requested_peft or {}))
    hyperparameters = _resolved_hyperparameters(
        dict(requested_hyperparameters or {}), n_examples, peft["type"], param_prefix
    )
    spec = peft_spec(peft)
    try:
        spec.validate()
        # The job's seed is drawn later; any valid one checks the rest.
        train_config(hyperparameters, peft, seed=0, default_checkpoint_every=None).validate()
    except HyperparameterError as exc:
        field = _request_field(exc.param, param_prefix)
        raise InvalidParameter(f"Invalid '{field}': {exc.message}.", param=field) from exc
    return _with_defaults(peft, spec), hyperparameters


def _requested_peft(requested: dict[str, Any]) -> dict[str, Any]:
    """The request's `peft` in the stored shape, its values as given (None where the library decides)."""
    peft_type = requested.get("type")
    peft_type = "svfit" if peft_type is None else peft_type  # "" is a wrong type, not the default
    if peft_type not in PEFT_TYPES:
        raise InvalidParameter(
            f"'peft.type' must be one of {', '.join(PEFT_TYPES)}, got {shown(peft_type)}.", param="peft.type"
        )
    values = {name: _whole(name, value) for name, value in requested.items()}
    options = {name: values[name] for name in PEFT_OPTIONS if values.get(name) is not None}
    if peft_type == "full":
        return {"type": "full", **options}
    # What the other types take is dropped: svfit has no alpha, lora no energy (full kept none above).
    shape = ("rank", "alpha", "target_modules") if peft_type == "lora" else ("rank", "energy", "target_modules")
    return {"type": peft_type, **{name: values.get(name) for name in shape}, **options}


def _whole(name: str, value: Any) -> Any:
    return int(value) if name in _WHOLE_NUMBERS and isinstance(value, float) and value.is_integer() else value


def _with_defaults(peft: dict[str, Any], spec: PeftSpec) -> dict[str, Any]:
    """The validated `peft` with the library's defaults decided now (targets, rank, LoRA's alpha), so the job
    object shows them and a later change of the defaults never changes a job already created."""
    if peft["type"] == "full":
        return peft
    resolved = spec.resolved()
    decided = {"target_modules": resolved.target_modules, "rank": resolved.rank}
    if peft["type"] == "lora":
        decided["alpha"] = float(resolved.lora_alpha)
    if peft["type"] == "svfit" and peft["energy"] is not None:
        decided["energy"] = float(peft["energy"])
    return {**peft, **decided}


def _request_field(param: str | None, param_prefix: str) -> str:
    """The request field a library HyperparameterError is about."""
    if param == "learning_rate":  # set through the multiplier, which can underflow it to 0
        return f"{param_prefix}.learning_rate_multiplier"
    request_names = {"lora_alpha": "alpha", **{library: name for name, library in LIBRARY_NAMES.items()}}
    return f"peft.{request_names.get(param, param)}"


def _resolved_hyperparameters(
    requested: dict[str, Any], n_examples: int, peft_type: str, param_prefix: str
) -> dict[str, Any]:
    """Absolute n_epochs, batch_size and learning_rate_multiplier, plus the learning rate itself."""
    n_epochs = requested.get("n_epochs")
    batch_size = requested.get("batch_size")
    multiplier = requested.get("learning_rate_multiplier")

    if _is_auto(n_epochs):
        n_epochs = auto_n_epochs(n_examples)
    else:
        n_epochs = _integer(n_epochs, f"{param_prefix}.n_epochs", *N_EPOCHS_BOUNDS)
    if _is_auto(batch_size):
        batch_size = auto_batch_size(n_examples)
    else:
        batch_size = _integer(batch_size, f"{param_prefix}.batch_size", *BATCH_SIZE_BOUNDS)
    if _is_auto(multiplier):
        multiplier = 1.0
    else:
        multiplier = _positive_number(multiplier, f"{param_prefix}.learning_rate_multiplier")
    return {
        "n_epochs": n_epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": multiplier,
        "learning_rate": DEFAULT_LEARNING_RATE[peft_type] * multiplier,
    }


def _is_auto(value: Any) -> bool:
    return value is None or value == "auto"


def _integer(value: Any, param: str, low: int, high: int) -> int:
    # A whole float counts (JSON has one number type); inf and NaN (JSON `1e999`, `NaN`) have no int().
    if not finite_number(value) or value != int(value):
        raise InvalidParameter(f"'{param}' must be an integer or \"auto\", got {shown(value)}.", param=param)
    value = int(value)
    if not low <= value <= high:
        raise InvalidParameter(f"'{param}' must be between {low} and {high}, got {shown(value)}.", param=param)
    return value


def _positive_number(value: Any, param: str) -> float:
    if not finite_number(value) or value <= 0:
        raise InvalidParameter(
            f"'{param}' must be a positive finite number or \"auto\", got {shown(value)}.", param=param
        )
    return float(value)


# --- stored -> library ---------------------------------------------------------------------------------


def peft_spec(peft: Mapping[str, Any]) -> PeftSpec:
    """The library's PeftSpec for a stored `peft`. A None in it leaves the library's default."""
    values = {
        "method": peft["type"],
        "rank": peft.get("rank"),
        "energy": peft.get("energy"),
        "target_modules": peft.get("target_modules"),
        "lora_alpha": peft.get("alpha"),
        **{name: peft.get(name) for name in SPEC_OPTIONS},
    }
    return PeftSpec(**{name: value for name, value in values.items() if value is not None})


def train_config(
    hyperparameters: Mapping[str, Any],
    peft: Mapping[str, Any],
    *,
    seed: int,
    default_checkpoint_every: int | None,
) -> TrainConfig:
    """The library's TrainConfig: epochs, batch size and the absolute learning rate from `hyperparameters`,
    training options from `peft`, checkpoints every `default_checkpoint_every` steps unless `peft` says."""
    options = {LIBRARY_NAMES.get(name, name): peft[name] for name in TRAIN_OPTIONS if peft.get(name) is not None}
    options.setdefault("checkpoint_every", default_checkpoint_every)
    return TrainConfig(
        n_epochs=hyperparameters["n_epochs"],
        batch_size=hyperparameters["batch_size"],
        learning_rate=hyperparameters["learning_rate"],
        seed=seed,
        **options,
    )
