"""The names of what a training run writes, torch-free so the service can read them without the library.

Under ``output_dir``: ``checkpoints/step-N/`` (a servable adapter plus the training state) and ``final/``
(a servable adapter). Every adapter folder carries ``TRAINING_META``; ``outputs.py`` converts one into
each of ``ARTIFACT_FORMATS``.
"""

from __future__ import annotations

TRAINING_META = "training_meta.json"
META_FORMAT_VERSION = 1
FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"

ARTIFACT_FORMATS = ("svfit", "peft_lora", "merged")
# Which training methods can produce each format.
FORMAT_METHODS = {
    "svfit": frozenset({"svfit"}),
    "peft_lora": frozenset({"svfit", "lora", "pissa"}),
    "merged": frozenset({"svfit", "lora", "pissa", "full", "head_only"}),
}


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step}"


def step_of_checkpoint_dir(name: str) -> int | None:
    """The step of a ``step-N`` folder name, or None for any other name."""
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None
