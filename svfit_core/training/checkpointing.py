"""Training state on disk, safetensors and JSON only (never pickle): optimizer moments, the schedule's step,
RNG states and the data position, plus atomic directory writes.

A checkpoint folder ``step-N/`` holds the servable adapter (written by the method) and two more files:
``training_state.safetensors`` (optimizer tensors by parameter name, torch RNG states) and
``training_state.json`` (everything else). Folders are written as ``step-N.part`` and renamed, so a
reader never sees half a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from svfit_core.errors import AdapterFormatError

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
STATE_FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh ``<final>.part`` folder to fill; on success it replaces ``final`` in one rename."""
    part = final.with_name(final.name + ".part")
    if part.exists():
        shutil.rmtree(part)  # left by a crash mid-write
    part.mkdir(parents=True)
    try:
        yield part
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)  # an older run got this far before; this write supersedes it
    os.replace(part, final)


# -- optimizer ---------------------------------------------------------------------------------------


def _optimizer_names(optimizer: torch.optim.Optimizer) -> list[str]:
    # state_dict() numbers parameters in group order; param_names (set by build_param_groups) name them.
    return [name for group in optimizer.param_groups for name in group["param_names"]]


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as ``{"optimizer.<param name>.<key>": tensor}`` plus a JSON-able remainder."""
    state_dict = optimizer.state_dict()
    names = _optimizer_names(optimizer)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{names[index]}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(names[index], {})[key] = value
    groups = [
        {k: _json_value(v) for k, v in group.items() if k != "params"} for group in state_dict["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict) -> None:
    """Load flattened state into an optimizer built over the same named parameters, in the same groups."""
    current = optimizer.state_dict()
    saved_groups = saved["param_groups"]
    if [g["param_names"] for g in saved_groups] != [g["param_names"] for g in current["param_groups"]]:
        raise AdapterFormatError("the checkpoint's optimizer was built over different parameters")
    names = _optimizer_names(optimizer)
    state: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(names):
        prefix = f"optimizer.{name}."
        # state keys (exp_avg, step) have no dot, so a longer name sharing the prefix cannot match
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        entry.update(saved["scalars"].get(name, {}))
        if entry:
            state[index] = entry
    groups = []
    for saved_group, current_group in zip(saved_groups, current["param_groups"], strict=True):
        group = dict(saved_group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        group["params"] = current_group["params"]
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- RNG ---------------------------------------------------------------------------------------------


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = cuda_state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def restore_rng(tensors: dict[str, torch.Tensor], saved: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- the whole training state ------------------------------------------------------------------------


@dataclass
class TrainingState:
    """Where a run stood after optimizer step ``step``: the next batch is ``batch_index`` of ``epoch``."""

    step: int
    epoch: int
    batch_index: int
    shuffle_seed: int
    trained_tokens: int
    total_steps: int
    run: dict = field(default_factory=dict)  # resolved method, peft and config, to check a resume
    metrics: dict = field(default_factory=dict)  # the latest train/valid metrics
    optimizer_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_json: dict = field(default_factory=dict)
    rng_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    rng_json: dict = field(default_factory=dict)


def save_training_state(folder: Path, state: TrainingState) -> None:
    save_file({**state.optimizer_tensors, **state.rng_tensors}, folder / STATE_TENSORS)
    document = {
        "format_version": STATE_FORMAT_VERSION,
        "step": state.step,
        "epoch": state.epoch,
        "batch_index": state.batch_index,
        "shuffle_seed": state.shuffle_seed,
        "trained_tokens": state.trained_tokens,
        "total_steps": state.total_steps,
        "run": state.run,
        "metrics": state.metrics,
        "optimizer": state.optimizer_json,
        "rng": state.rng_json,
    }
    (folder / STATE_JSON).write_text(json.dumps(document, indent=1))


def load_training_state(folder: Path) -> TrainingState:
    folder = Path(folder)
    if not (folder / STATE_JSON).is_file() or not (folder / STATE_TENSORS).is_file():
        raise AdapterFormatError(f"{folder} is not a training checkpoint (no {STATE_JSON} / {STATE_TENSORS})")
    document = json.loads((folder / STATE_JSON).read_text())
    if document.get("format_version") != STATE_FORMAT_VERSION:
        raise AdapterFormatError(f"unknown training state format {document.get('format_version')!r} in {folder}")
    tensors = load_file(folder / STATE_TENSORS)
    return TrainingState(
        step=document["step"],
        epoch=document["epoch"],
        batch_index=document["batch_index"],
        shuffle_seed=document["shuffle_seed"],
        trained_tokens=document["trained_tokens"],
        total_steps=document["total_steps"],
        run=document["run"],
        metrics=document["metrics"],
        optimizer_tensors={k: v for k, v in tensors.items() if k.startswith("optimizer.")},
        optimizer_json=document["optimizer"],
        rng_tensors={k: v for k, v in tensors.items() if k.startswith("rng.")},
        rng_json=document["rng"],
    )
