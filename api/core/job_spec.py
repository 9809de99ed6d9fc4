"""The job-spec contract, both ways: a creation request's `peft` and hyperparameters become the spec stored on
the job, and a stored spec becomes the training library's `PeftSpec` and `TrainConfig`.

Stored in `jobs.peft` (and echoed by the job object): {"type": "svfit", "rank", "energy", "target_modules"},
{"type": "lora", "rank", "alpha", "target_modules"} or {"type": "full"}, plus the PEFT_OPTIONS the request set.
Stored in `jobs.hyperparameters`: {"n_epochs", "batch_size", "learning_rate_multiplier", "learning_rate"}, plus
"beta" for a DPO job, and "compute_multiplier", "eval_interval", "eval_samples", "reasoning_effort" for a
reinforcement job. Stored in `jobs.method`: OpenAI's `{"type": "supervised"|"dpo"|"reinforcement", <type>:
{"hyperparameters": ...}}`, echoing the same values, and a reinforcement job's `grader` as given.

Every "auto" is decided at creation, so the job object echoes exactly what will run. Values are judged by the
library's own validators, run here on the spec the worker will build, and a bad one is an `InvalidParameter`
naming the request's field. This module checks only what the library never sees: the request's JSON shape,
the service's own bounds on epochs, batch size, the learning-rate multiplier and DPO's beta, and which method
a file's data format trains with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from api.core.errors import InvalidGrader, InvalidParameter, InvalidTrainingFile, MissingParameter
from graders import GraderError, validate_grader
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
    # Reinforcement only: the longest answer sampled, and the weight of the KL term to the starting model.
    "max_completion_tokens",
    "kl_coef",
)
PEFT_OPTIONS = SPEC_OPTIONS + TRAIN_OPTIONS
# A request counts GPUs; the library counts processes (one device each), which on CPU are not GPUs.
LIBRARY_NAMES = {"gpus": "world_size"}
# JSON has one number type: a whole 4.0 in these is the integer 4 (as for n_epochs), before the library's
# integer rules see it.
_WHOLE_NUMBERS = (
    "rank", "band", "max_seq_length", "checkpoint_every", "eval_every", "max_steps", "gradient_accumulation_steps",
    "gpus", "max_completion_tokens",
)

N_EPOCHS_BOUNDS = (1, 50)
BATCH_SIZE_BOUNDS = (1, 256)

# OpenAI's rule for `n_epochs: "auto"`: aim at 3 epochs, but see at least 100 and at most 25,000 examples.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MAX_AUTO_EPOCHS = 25

HYPERPARAMETER_NAMES = ("n_epochs", "batch_size", "learning_rate_multiplier")

# OpenAI's `method.type`s this service trains. A DPO job trains on preference data and only on it; the library
# then takes DPO's loss, against the starting model as the reference.
METHOD_TYPES = ("supervised", "dpo", "reinforcement")
PREFERENCE_FORMAT = "preference"
# A reinforcement job trains on prompts (conversations awaiting the answer) and only on them.
PROMPT_FORMAT = "prompt"
# DPO's beta for "auto": the DPO paper's and TRL's default. Useful values lie around 0.01 to 0.5; at 10 the loss
# already saturates after the smallest move away from the reference, so a larger value is a slip, not a choice.
DEFAULT_DPO_BETA = 0.1
MAX_DPO_BETA = 10.0
# A DPO job's learning rate at multiplier 1, as a multiple of the method's supervised default, per method.
# Measured on SmolLM2-135M-Instruct, SST-2 preference pairs (benchmarks/README.md, "DPO"): with 32 pairs and one
# seed, 1x moved neither method and 4x moved both. With 128 pairs and 3 seeds, SVFit at 4x never fitted its
# pairs (0.487 ± 0.029 held out, base 0.53); at 1x it reached 0.733 ± 0.127 and at 0.4x 0.683 ± 0.116. LoRA
# stays at 4x (0.680 ± 0.182, two good seeds of three); lower LoRA rates were not run at 128 pairs.
DPO_LEARNING_RATE_FACTOR = {"svfit": 1.0, "lora": 4.0, "full": 4.0}

# Reinforcement: `compute_multiplier` scales the answers sampled per prompt (GRPO's group), 4 at 1.0; a group
# needs two answers to compare, and more than 64 per prompt is a slip on any machine this runs on.
SAMPLES_PER_PROMPT = 4
SAMPLES_PER_PROMPT_BOUNDS = (2, 64)
EVAL_SAMPLES_BOUNDS = (1, 16)
EVAL_INTERVAL_BOUNDS = (1, 100_000)
REASONING_EFFORTS = ("default", "low", "medium", "high")
# A reinforcement job's learning rate at multiplier 1, as a multiple of the method's supervised default, per method.
# Measured on SmolLM2-135M-Instruct, SST-2 prompts, 33 steps (benchmarks/README.md, "Reinforcement"): SVFit at 1x
# moved far (KL about 1 per token) and lost reward (-0.02), at 0.25x it gained the most (+0.09); LoRA gained +0.05
# at 1x and lost at 0.25x and 4x. None of it beyond two standard errors there. On short sums (the benchmark's
# default task, 3 seeds) these rates give SVFit +0.461 ± 0.016 and LoRA +0.458 ± 0.024 held-out reward; other
# rates were not tried on that task. Full fine-tuning: not measured.
REINFORCEMENT_LEARNING_RATE_FACTOR = {"svfit": 0.25, "lora": 1.0, "full": 1.0}
REINFORCEMENT_HYPERPARAMETERS = ("compute_multiplier", "eval_interval", "eval_samples", "reasoning_effort")


def auto_n_epochs(n_examples: int) -> int:
    n_examples = max(1, n_examples)
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


# The fewest optimizer steps an "auto" batch size leaves a run: a small file in batches of 8 gets a dozen
# updates, too few to move off the majority answer. Measured on SmolLM2-135M, SST-2 as chat, 32 examples x 4
# epochs (benchmarks/README.md, "Small files"): batches of 4 (32 steps) against 8 (16 steps) took SVFit from
# 0.515 to 0.610 and LoRA from 0.575 to 0.795 exact match.
MIN_AUTO_STEPS = 32


def auto_batch_size(n_examples: int, n_epochs: int = TARGET_EPOCHS) -> int:
    """About 0.2% of the data set (OpenAI's rule of thumb), rounded to a power of two.

    Never below 8 (or the whole set, when smaller): a batch of one or two makes a noisy, slow run. Except
    that a run of ``n_epochs`` over a small file takes the largest batch that still gives it
    ``MIN_AUTO_STEPS`` optimizer steps (down to 1, for a file too small to reach them).
    """
    n_examples = max(1, n_examples)
    target = max(1.0, n_examples * 0.002)
    power_of_two = 2 ** round(math.log2(target))
    batch = int(min(BATCH_SIZE_BOUNDS[1], max(min(8, n_examples), power_of_two)))
    while batch > 1 and n_epochs * math.ceil(n_examples / batch) < MIN_AUTO_STEPS:
        batch -= 1
    return batch


# --- method ----------------------------------------------------------------------------------------------


def check_method_type(method_type: Any, reinforcement: Mapping[str, Any] | None = None) -> str:
    """`method.type` if this service trains it, else a 400 naming `method.type`. A reinforcement job's grader
    (`reinforcement`: the request's `method.reinforcement` block) is checked here too, the 400 naming its field."""
    if method_type == "reinforcement":
        _check_reinforcement_grader(reinforcement or {})
    if method_type in METHOD_TYPES:
        return method_type
    raise InvalidParameter(
        f"'method.type' must be one of {', '.join(METHOD_TYPES)}, got {shown(method_type)}.", param="method.type"
    )


def _check_reinforcement_grader(reinforcement: Mapping[str, Any]) -> None:
    """A 400 naming the grader's offending field (`method.reinforcement.grader.graders.judge.input`), with the
    graders library's code. Only its shape: whether its model graders' models exist needs the database
    (api/services/jobs.py checks it)."""
    param = "method.reinforcement.grader"
    grader = reinforcement.get("grader")
    if grader is None:
        raise MissingParameter(f"Missing required parameter: '{param}'.", param=param)
    try:
        validate_grader(grader, param)
    except GraderError as exc:
        raise InvalidGrader.of(exc) from exc


def check_file_fits_method(method_type: str, data_format: str | None, file_id: str, *, param: str) -> None:
    """A 400 naming `param` unless the file's data format is one `method_type` trains on: DPO takes preference
    data only, and preference data trains only with DPO; reinforcement and prompts likewise."""
    if method_type == "reinforcement" and data_format != PROMPT_FORMAT:
        raise InvalidTrainingFile(
            f"File '{file_id}' holds {data_format} examples, but a reinforcement job needs prompts: one "
            '{"messages": [..., {"role": "user", "content": ...}], <fields the grader reads>} object per line, '
            "the conversation ending before the answer the model samples.",
            param=param,
        )
    if method_type != "reinforcement" and data_format == PROMPT_FORMAT:
        raise InvalidTrainingFile(
            f"File '{file_id}' holds prompts without answers (each line's messages end before the assistant's "
            'turn): they train by reinforcement, method: {"type": "reinforcement", "reinforcement": {"grader": '
            "{...}}}. For supervised training, end each line with the assistant's answer.",
            param=param,
        )
    if method_type == "dpo" and data_format != PREFERENCE_FORMAT:
        raise InvalidTrainingFile(
            f"File '{file_id}' holds {data_format} examples, but a DPO job needs preference data: one "
            '{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}], '
            '"non_preferred_output": [{"role": "assistant", "content": ...}]} object per line.',
            param=param,
        )
    if method_type != "dpo" and data_format == PREFERENCE_FORMAT:
        raise InvalidTrainingFile(
            f"File '{file_id}' holds preference data, which trains with DPO: set method.type = \"dpo\" "
            '(method: {"type": "dpo", "dpo": {"hyperparameters": {...}}}).',
            param=param,
        )


def stored_method(
    method_type: str, hyperparameters: Mapping[str, Any], grader: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The job's `method`, echoing the resolved hyperparameters the way OpenAI's job object does, and a
    reinforcement job's grader."""
    extra = {"dpo": ("beta",), "reinforcement": REINFORCEMENT_HYPERPARAMETERS}.get(method_type, ())
    block: dict[str, Any] = {"hyperparameters": {name: hyperparameters[name] for name in HYPERPARAMETER_NAMES + extra}}
    if method_type == "reinforcement":
        block = {"grader": dict(grader or {}), **block}
    return {"type": method_type, method_type: block}


# --- request -> stored ---------------------------------------------------------------------------------


def resolve_request(
    requested_peft: Mapping[str, Any] | None,
    requested_hyperparameters: Mapping[str, Any] | None,
    *,
    n_examples: int,
    param_prefix: str = "hyperparameters",
    method_type: str = "supervised",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `peft` and `hyperparameters` a new job stores. `param_prefix` is where the request put its
    hyperparameters (`hyperparameters` or `method.<type>.hyperparameters`), for naming a bad one; a DPO job's
    also hold `beta`."""
    peft = _requested_peft(dict(requested_peft or {}))
    hyperparameters = _resolved_hyperparameters(
        dict(requested_hyperparameters or {}), n_examples, peft["type"], param_prefix
    )
    if method_type == "dpo":
        hyperparameters["learning_rate"] *= DPO_LEARNING_RATE_FACTOR[peft["type"]]
        hyperparameters["beta"] = _dpo_beta((requested_hyperparameters or {}).get("beta"), f"{param_prefix}.beta")
    if method_type == "reinforcement":
        hyperparameters["learning_rate"] *= REINFORCEMENT_LEARNING_RATE_FACTOR[peft["type"]]
        hyperparameters.update(_reinforcement_hyperparameters(
            dict(requested_hyperparameters or {}), n_examples, hyperparameters["batch_size"], param_prefix
        ))
    spec = peft_spec(peft)
    try:
        spec.validate()
        # The job's seed is drawn later; any valid one checks the rest.
        config = train_config(hyperparameters, peft, seed=0, default_checkpoint_every=None)
        config.validate()
    except HyperparameterError as exc:
        field = _request_field(exc.param, param_prefix)
        raise InvalidParameter(f"Invalid '{field}': {exc.message}.", param=field) from exc
    if method_type == "reinforcement" and config.max_seq_length <= config.max_completion_tokens:
        raise InvalidParameter(
            f"'peft.max_completion_tokens' ({config.max_completion_tokens}) must be below 'peft.max_seq_length' "
            f"({config.max_seq_length}): a prompt gets what the sampled answer leaves.",
            param="peft.max_completion_tokens",
        )
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
    if param == "dpo_beta":
        return f"{param_prefix}.beta"
    if param in ("eval_samples", "samples_per_prompt"):
        return f"{param_prefix}.{'compute_multiplier' if param == 'samples_per_prompt' else param}"
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
        batch_size = auto_batch_size(n_examples, n_epochs)
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


def _dpo_beta(value: Any, param: str) -> float:
    if _is_auto(value):
        return DEFAULT_DPO_BETA
    if not finite_number(value) or not 0 < value <= MAX_DPO_BETA:
        raise InvalidParameter(
            f"'{param}' must be a number above 0 and at most {MAX_DPO_BETA:g}, or \"auto\", got {shown(value)}.",
            param=param,
        )
    return float(value)


def _reinforcement_hyperparameters(
    requested: dict[str, Any], n_examples: int, batch_size: int, param_prefix: str
) -> dict[str, Any]:
    """compute_multiplier (auto: 1.0, the 4 answers per prompt times it, 2 to 64), eval_interval (auto: once
    an epoch), eval_samples (auto: 1) and reasoning_effort (echoed; a model that does not reason ignores it)."""
    multiplier = requested.get("compute_multiplier")
    param = f"{param_prefix}.compute_multiplier"
    multiplier = 1.0 if _is_auto(multiplier) else _positive_number(multiplier, param)
    low, high = SAMPLES_PER_PROMPT_BOUNDS
    if not low <= round(SAMPLES_PER_PROMPT * multiplier) <= high:
        raise InvalidParameter(
            f"'{param}' sets {SAMPLES_PER_PROMPT} x multiplier answers per prompt, which must be from {low} to "
            f"{high}: the multiplier must be from {low / SAMPLES_PER_PROMPT:g} to {high / SAMPLES_PER_PROMPT:g}, "
            f"got {shown(multiplier)}.", param=param,
        )
    interval = requested.get("eval_interval")
    if _is_auto(interval):
        interval = max(1, math.ceil(max(1, n_examples) / batch_size))
    else:
        interval = _integer(interval, f"{param_prefix}.eval_interval", *EVAL_INTERVAL_BOUNDS)
    samples = requested.get("eval_samples")
    samples = 1 if _is_auto(samples) else _integer(samples, f"{param_prefix}.eval_samples", *EVAL_SAMPLES_BOUNDS)
    effort = requested.get("reasoning_effort")
    effort = "default" if effort is None else effort
    if effort not in REASONING_EFFORTS:
        raise InvalidParameter(
            f"'{param_prefix}.reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}, got {shown(effort)}.",
            param=f"{param_prefix}.reasoning_effort",
        )
    return {"compute_multiplier": multiplier, "eval_interval": interval, "eval_samples": samples,
            "reasoning_effort": effort}


def samples_per_prompt(compute_multiplier: float) -> int:
    """The answers sampled per prompt at a reinforcement job's `compute_multiplier`."""
    return round(SAMPLES_PER_PROMPT * compute_multiplier)


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
    """The library's TrainConfig: epochs, batch size and the absolute learning rate (and a DPO job's beta) from
    `hyperparameters`, training options from `peft`, checkpoints every `default_checkpoint_every` steps unless
    `peft` says."""
    options = {LIBRARY_NAMES.get(name, name): peft[name] for name in TRAIN_OPTIONS if peft.get(name) is not None}
    options.setdefault("checkpoint_every", default_checkpoint_every)
    if hyperparameters.get("beta") is not None:
        # Only a DPO job stores one; the library uses it only on preference data, which such a job always has.
        options["dpo_beta"] = hyperparameters["beta"]
    if hyperparameters.get("compute_multiplier") is not None:
        # Only a reinforcement job stores these; the library uses them only on prompts, which it always has.
        options["samples_per_prompt"] = samples_per_prompt(hyperparameters["compute_multiplier"])
        options["eval_samples"] = hyperparameters["eval_samples"]
        options.setdefault("eval_every", hyperparameters["eval_interval"])
    return TrainConfig(
        n_epochs=hyperparameters["n_epochs"],
        batch_size=hyperparameters["batch_size"],
        learning_rate=hyperparameters["learning_rate"],
        seed=seed,
        **options,
    )
