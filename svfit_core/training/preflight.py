"""The checks a run makes before it loads its base model: that its smallest step, one example of
``max_seq_length`` tokens, fits the device's free memory by ``memory.estimate_memory``, and that loading fits
the host's available RAM. A job that cannot fit fails in seconds with a typed error that says what would fit,
not with an out-of-memory error after minutes of loading and SVDs, or a worker killed mid-load.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from svfit_core.errors import ConfigError, DeviceMemoryError, HostMemoryError
from svfit_core.loading import DTYPES, checkpoint_dtype, max_positions, read_model_config, resolve_model_source
from svfit_core.targets import resolve_targets
from svfit_core.training.memory import estimate_memory, free_device_memory, shape_model
from svfit_core.training.methods import attention_targets
from svfit_core.training.run_config import PeftSpec, TrainConfig

__all__ = ["available_host_memory", "check_memory", "host_bytes_to_load"]

log = logging.getLogger(__name__)

GB = 10**9  # messages and reports count decimal gigabytes, as GPU and RAM sizes are quoted
MEMINFO = Path("/proc/meminfo")
# Ranks offered when the job's does not fit: the largest of these below it that fits.
RANK_STEPS = (2048, 1024, 512, 256, 128, 64, 32, 16, 8)
# The estimate's parts, in the order messages and the start event list them.
PARTS = ("base", "bases", "trainable", "gradients", "optimizer", "activations", "loss")

# (spec, config) -> (the estimate, whether it counts gradient checkpointing on)
Estimator = Callable[[PeftSpec, TrainConfig], tuple[dict[str, int], bool]]


def check_memory(
    path: Path, task: str, num_labels: int | None, peft: PeftSpec, config: TrainConfig, device: torch.device,
    objective: str = "supervised",
) -> dict | None:
    """Fail before loading when the job cannot fit, else return the estimate in GB for the start event.

    Raises ``DeviceMemoryError`` when one example of ``config.max_seq_length`` tokens does not fit the free
    memory of a CUDA ``device`` by the estimate (other devices get no device check: CPU runs are small), and
    ``HostMemoryError`` when loading needs more RAM than is available. ``config`` is resolved as the run
    holds it (``base_dtype``, ``bf16``). Returns None, with a log line, when the base's shape cannot be read
    without loading it (a GGUF file transformers cannot describe, an architecture it does not know).
    """
    model_config = read_model_config(path)
    try:
        model = shape_model(model_config, task, num_labels) if model_config is not None else None
    except (KeyError, ValueError, TypeError):  # no model_type, or one transformers does not know
        model = None
    if model is None:
        log.info("memory pre-flight skipped: the shape of %s cannot be read without loading it", path)
        return None

    free = free_device_memory(device) if device.type == "cuda" else None
    positions = max_positions(model)
    if positions is not None and config.max_seq_length > positions:
        config = replace(config, max_seq_length=positions)  # the run truncates rows to the position embeddings

    def estimate(spec: PeftSpec, cfg: TrainConfig) -> tuple[dict[str, int], bool]:
        # Checkpointing left automatic goes on only when the example does not fit without it, as
        # ``plan_memory`` decides once the model is loaded; never off CUDA.
        checkpointing = bool(cfg.gradient_checkpointing)
        parts = estimate_memory(model_config, spec, replace(cfg, gradient_checkpointing=checkpointing), task=task,
                                num_labels=num_labels, objective=objective)
        if cfg.gradient_checkpointing is None and free is not None and parts["total"] > free:
            checkpointing = True
            parts = estimate_memory(model_config, spec, replace(cfg, gradient_checkpointing=True), task=task,
                                    num_labels=num_labels, objective=objective)
        return parts, checkpointing

    parts, checkpointing = estimate(peft, config)
    # The whole free memory, not plan_memory's usable share: this check refuses only what cannot run, and the
    # loop's micro-batches and retries absorb what the estimate leaves out.
    if free is not None and parts["total"] > free:
        options = _what_fits(estimate, model, peft, config, free)
        raise DeviceMemoryError(_device_message(parts, checkpointing, config.max_seq_length, free, device, options),
                                tokens=config.max_seq_length)

    dtype = DTYPES[config.base_dtype]
    needed, available = host_bytes_to_load(path, model, dtype, device), available_host_memory()
    if needed > available:
        raise HostMemoryError(
            f"Loading the base model needs about {needed / GB:.1f} GB of host memory (RAM) but "
            f"{available / GB:.1f} GB is available: use a worker with more memory or a smaller base model.",
            needed=needed, available=available,
        )
    report = {f"{name}_gb": _in_gb(parts[name]) for name in (*PARTS, "total")}
    return {**report, "free_gb": None if free is None else _in_gb(free), "tokens": config.max_seq_length,
            "gradient_checkpointing": checkpointing}


def _in_gb(size: int) -> float:
    return float(f"{size / GB:.4g}")  # significant digits: a test model's kilobytes do not round to zero


def _what_fits(estimate: Estimator, model: nn.Module, peft: PeftSpec, config: TrainConfig, free: int) -> list[str]:
    """Each single change to the job that fits ``free`` by the same estimate: the largest max_seq_length, the
    largest rank of ``RANK_STEPS`` below the job's, the architecture's q/v projections where they are fewer."""

    def total(spec: PeftSpec, cfg: TrainConfig) -> int:
        return estimate(spec, cfg)[0]["total"]

    options = []
    if config.max_seq_length > 1 and total(peft, replace(config, max_seq_length=1)) <= free:
        # The total grows with the length: bisect for the largest that fits.
        low, high = 1, config.max_seq_length - 1
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if total(peft, replace(config, max_seq_length=mid)) <= free else (low, mid - 1)
        options.append(f"max_seq_length {low:,} ({_gb(total(peft, replace(config, max_seq_length=low)))})")
    if peft.method in ("svfit", "lora", "pissa"):
        current_rank = peft.resolved().rank  # None: every singular value (an energy rule may reach k)
        for rank in (r for r in RANK_STEPS if current_rank is None or r < current_rank):
            needed = total(replace(peft, rank=rank), config)
            if needed <= free:
                options.append(f"rank {rank} ({_gb(needed)})")
                break
        try:
            defaults = attention_targets(model)
        except ConfigError:  # no default for this architecture: nothing smaller to name
            defaults = None
        if defaults is not None:
            chosen = set(resolve_targets(model, peft.resolved().target_modules))
            if set(resolve_targets(model, defaults)) < chosen:
                needed = total(replace(peft, target_modules=defaults), config)
                if needed <= free:
                    options.append(f"target_modules {defaults} ({_gb(needed)})")
    return options


def _gb(size: int) -> str:
    return f"about {size / GB:.1f} GB"


def _device_message(parts: dict[str, int], checkpointing: bool, tokens: int, free: int, device: torch.device,
                    options: list[str]) -> str:
    listed = ", ".join(f"{name} {parts[name] / GB:.2f}" for name in PARTS if parts[name] >= GB // 200)
    with_checkpointing = " with gradient checkpointing" if checkpointing else ""
    message = (f"This job needs {_gb(parts['total'])} of device memory for one example of {tokens:,} tokens"
               f"{with_checkpointing} ({listed} GB), but {device} has {free / GB:.1f} GB free. ")
    if options:
        return message + "By the same estimate each of these would fit: " + "; ".join(options) + "."
    return message + ("No shorter max_seq_length, smaller rank or fewer target modules fits: use a smaller base "
                      "model or a GPU with more free memory.")


# -- host memory ------------------------------------------------------------------------------------------


def host_bytes_to_load(path: Path, model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Host memory ``load_base_model`` needs at its peak to load the base ``model`` (its meta-device shape)
    in ``dtype`` onto ``device``, assuming it loads as transformers does:

    - a Hugging Face folder onto the CPU: the weight files' tensors as stored, plus a converted copy of every
      weight when ``dtype`` differs from the stored dtype (the model ends up on the host either way);
    - onto an accelerator (``device_map``): the weights go to the device one at a time, so about the largest
      weight as stored plus its converted copy;
    - a GGUF file, onto any device: transformers dequantises the whole file into an fp32 state dict on the
      host first, then converts as above (every weight on the CPU, one at a time on an accelerator). The
      file itself is memory-mapped, page cache the kernel can reclaim, and not counted.
    """
    folder, gguf_file = resolve_model_source(path)
    sizes = [p.numel() for p in model.parameters()]
    params, largest = sum(sizes), max(sizes)
    if gguf_file:
        held, stored_bytes = 4 * params, 4
        converts = dtype != torch.float32
    else:
        held = sum(f.stat().st_size for f in _weight_files(folder))
        stored_bytes = max(1, round(held / params))
        stored = checkpoint_dtype(path)  # a checkpoint that declares no dtype is judged by its size
        converts = stored != dtype if stored is not None else stored_bytes != dtype.itemsize
    copy = dtype.itemsize if converts else 0
    if device.type == "cpu":
        return held + params * copy
    if gguf_file:
        return held + largest * copy
    return largest * (stored_bytes + copy)


def _weight_files(folder: Path) -> list[Path]:
    # What transformers reads: safetensors when there are any, else PyTorch pickles.
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def available_host_memory() -> int:
    """Bytes the host can still give without swapping: ``MemAvailable`` from /proc/meminfo (free memory plus
    the page cache the kernel can reclaim), or the free physical pages where there is no such file."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
