"""Resolving a job request's hyperparameters and PEFT options into the absolute values the worker trains with.

Every `"auto"` is decided here, at job creation, so the job object echoes exactly what will run and a
re-run of the same job trains the same way. Bad values raise `InvalidParameter` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from api.core.errors import InvalidParameter

PEFT_TYPES = ("svfit", "lora", "full")

# Learning rate at multiplier 1.0, per method. SVFit trains singular values, which are O(1-10) and need a
# rate one to two orders of magnitude above LoRA's (SVFT's published recipe uses 5e-2 to 8e-2, see
# shared/SVFIT.md); 5e-4 is the common LoRA rate and 5e-5 the common rate for full fine-tuning.
# Kept equal to svfit_core.training.config.DEFAULT_LEARNING_RATE (a test checks it) without importing the
# training library, which costs seconds of start-up.
METHOD_DEFAULT_LEARNING_RATE = {"svfit": 5e-2, "lora": 5e-4, "full": 5e-5}

DEFAULT_LORA_RANK = 8  # and lora_alpha = 2 x rank, as svfit_core.training.config.PeftSpec resolves them


MAX_INT32 = 2**31 - 1  # counts (steps, lengths) go into 32-bit columns and tensors' index types


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_INT32


def _finite(value: int | float) -> bool:
    """Representable as a finite float: not inf or NaN, and not an integer too large for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:  # math.isfinite(10**400) overflows converting to float
        return False


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)


def _shown(value: Any) -> str:
    """A request value as an error message quotes it: a hostile 4,000-digit number is cut short."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 80 else text[:77] + "..."


# Training options a request may add to `peft`; the worker hands them to the library's PeftSpec and
# TrainConfig. Checked here so a bad value is a 400 now rather than a failed job later.
PEFT_EXTRAS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "energy_measure": (lambda v: v in ("squared", "linear"), '"squared" or "linear"'),
    "train_bottom": (lambda v: isinstance(v, bool), "a boolean"),
    "max_seq_length": (_positive_int, "an integer from 1 to 2^31-1"),
    "checkpoint_every": (_positive_int, "an integer from 1 to 2^31-1"),
    "eval_every": (_positive_int, "an integer from 1 to 2^31-1"),
    "max_steps": (_positive_int, "an integer from 1 to 2^31-1"),
    "gradient_accumulation_steps": (_positive_int, "an integer from 1 to 2^31-1"),
    "gradient_checkpointing": (lambda v: isinstance(v, bool), "a boolean"),
    "warmup_ratio": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "head_learning_rate": (lambda v: _number(v) and v > 0, "a number > 0"),
    "lr_scheduler": (lambda v: v in ("linear", "cosine"), '"linear" or "cosine"'),
}

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


def _is_auto(value: Any) -> bool:
    return value is None or value == "auto"


def _integer(value: Any, param: str, low: int, high: int | None = None) -> int:
    # bool is an int in Python but never a meaningful count here; inf and NaN (JSON `1e999`, `NaN`) have
    # no int() at all.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or value != int(value):
        raise InvalidParameter(f"'{param}' must be an integer or \"auto\", got {_shown(value)}.", param=param)
    value = int(value)
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidParameter(f"'{param}' must be {bounds}, got {_shown(value)}.", param=param)
    return value


def _positive_number(value: Any, param: str) -> float:
    if not _number(value) or value <= 0:
        raise InvalidParameter(
            f"'{param}' must be a positive finite number or \"auto\", got {_shown(value)}.", param=param
        )
    return float(value)


def resolve_peft(requested: Mapping[str, Any] | None) -> dict[str, Any]:
    """The PEFT extension with every default filled in: what the job object echoes and the worker reads."""
    requested = dict(requested or {})
    peft_type = requested.get("type")
    peft_type = "svfit" if peft_type is None else peft_type  # "" is a wrong type, not the default
    if peft_type not in PEFT_TYPES:
        raise InvalidParameter(
            f"'peft.type' must be one of {', '.join(PEFT_TYPES)}, got {_shown(peft_type)}.", param="peft.type"
        )
    extras = {}
    for name, (is_valid, expected) in PEFT_EXTRAS.items():
        if requested.get(name) is not None:
            if not is_valid(requested[name]):
                raise InvalidParameter(
                    f"'peft.{name}' must be {expected}, got {_shown(requested[name])}.", param=f"peft.{name}"
                )
            extras[name] = requested[name]
    if peft_type == "full":
        return {"type": "full", **extras}

    rank = requested.get("rank")
    if rank is not None:
        rank = _integer(rank, "peft.rank", 1, MAX_INT32)
    target_modules = requested.get("target_modules")
    if target_modules is not None and not (
        (isinstance(target_modules, str) and target_modules)
        or (isinstance(target_modules, list) and target_modules and all(isinstance(m, str) and m for m in target_modules))
    ):
        raise InvalidParameter(
            "'peft.target_modules' must be a non-empty list of module names, or one name pattern such as "
            '"all-linear".',
            param="peft.target_modules",
        )

    if peft_type == "lora":
        rank = rank if rank is not None else DEFAULT_LORA_RANK
        alpha = requested.get("alpha")
        alpha = _positive_number(alpha, "peft.alpha") if alpha is not None else float(2 * rank)
        return {"type": "lora", "rank": rank, "alpha": alpha, "target_modules": target_modules, **extras}

    # SVFit: a fixed rank, or per matrix the smallest rank holding `energy` of its spectrum; neither
    # (the library's default) trains every singular value, r = k.
    energy = requested.get("energy")
    if energy is not None:
        if not (_number(energy) and 0 < energy <= 1):
            raise InvalidParameter(f"'peft.energy' must be in (0, 1], got {_shown(energy)}.", param="peft.energy")
        energy = float(energy)
    return {"type": "svfit", "rank": rank, "energy": energy, "target_modules": target_modules, **extras}


def resolve_hyperparameters(
    requested: Mapping[str, Any] | None, *, n_examples: int, peft_type: str, param_prefix: str = "hyperparameters"
) -> dict[str, Any]:
    """Absolute values for n_epochs, batch_size and learning_rate_multiplier, plus the learning rate itself."""
    requested = dict(requested or {})
    n_epochs = requested.get("n_epochs")
    batch_size = requested.get("batch_size")
    multiplier = requested.get("learning_rate_multiplier")

    n_epochs = auto_n_epochs(n_examples) if _is_auto(n_epochs) else _integer(n_epochs, f"{param_prefix}.n_epochs", *N_EPOCHS_BOUNDS)
    if _is_auto(batch_size):
        batch_size = auto_batch_size(n_examples)
    else:
        batch_size = _integer(batch_size, f"{param_prefix}.batch_size", *BATCH_SIZE_BOUNDS)
    multiplier = 1.0 if _is_auto(multiplier) else _positive_number(multiplier, f"{param_prefix}.learning_rate_multiplier")
    return {
        "n_epochs": n_epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": multiplier,
        "learning_rate": METHOD_DEFAULT_LEARNING_RATE[peft_type] * multiplier,
    }
