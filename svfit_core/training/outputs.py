"""Serving and exporting what training wrote: any ``checkpoints/step-N`` or ``final`` folder loads the same
way (its ``training_meta.json`` says which method and task), and converts to the downloadable formats.

Formats: ``svfit`` (the native adapter, SVFit runs only), ``peft_lora`` (a standard PEFT LoRA adapter:
SVFit exports exactly, LoRA and PiSSA already are one; at a serving rank, the best approximation of that
rank), ``merged`` (a full HF model folder with the update folded in, any method). Each export is written
atomically and carries a ``manifest.json`` of sha256 sums (for ``peft_lora`` also its rank and kept energy).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from svfit_core.bases import BasisStore
from svfit_core.serialization import read_adapter_config, save_svfit_adapter
from svfit_core.training.checkpointing import atomic_dir
from svfit_core.errors import AdapterFormatError, ConfigError, SVFitError
from svfit_core.export import export_merged, export_peft_lora, read_kept_energy, truncate_peft_lora
from svfit_core.loading import checkpoint_dtype, load_base_model
from svfit_core.training.methods import get_method
from svfit_core.training.layout import ARTIFACT_FORMATS, FORMAT_METHODS, TRAINING_META
from svfit_core.training.setup_resources import SetupResources

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ArtifactFormatUnavailable(SVFitError):
    """The requested download format does not exist for this job's method (e.g. ``svfit`` for a LoRA job)."""

    code = "artifact_format_unavailable"


def read_training_meta(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / TRAINING_META
    if not path.is_file():
        raise AdapterFormatError(f"{adapter_dir} holds no {TRAINING_META}; it was not written by run_training")
    return json.loads(path.read_text())


def load_trained_model(
    base_model_path: str | Path, adapter_dir: str | Path, bases: BasisStore | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase, dict]:
    """``(model, tokenizer, meta)`` ready for inference (eval mode). ``meta`` has method, task, label_names and
    text_pair (absent from adapters older than that record).
    ``bases``: the basis store a compact SVFit adapter's bases are read from (else its SVD is recomputed)."""
    adapter_dir = Path(adapter_dir)
    meta = read_training_meta(adapter_dir)
    label_names = meta.get("label_names")
    base, tokenizer = load_base_model(
        base_model_path,
        meta["task"],
        num_labels=len(label_names) if label_names else None,
        id2label=dict(enumerate(label_names)) if label_names else None,
    )
    model = get_method(meta["method"]).load(base, adapter_dir, resources=SetupResources(bases=bases))
    return model.eval(), tokenizer, meta


def write_artifact(
    base_model_path: str | Path,
    adapter_dir: str | Path,
    fmt: str,
    out_dir: str | Path,
    rank: int | None = None,
    *,
    bases: BasisStore | None = None,
    include_bases: bool = False,
) -> Path:
    """Write ``adapter_dir``'s weights as ``fmt`` into ``out_dir`` (replaced if present); return ``out_dir``.

    ``rank``: ``peft_lora`` only, a serving rank r′ (None: the trained rank, exact); modules above it are
    cut to their best rank-r′ approximation. ``bases``: the basis store a compact SVFit adapter's bases
    come from. ``include_bases``: ``svfit`` only, write U, V and s into the adapter (self-contained)
    instead of the compact σ and basis keys (which load anywhere by recomputing the SVD of the base).
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    meta = read_training_meta(adapter_dir)
    method = meta["method"]
    if fmt not in ARTIFACT_FORMATS:
        raise ArtifactFormatUnavailable(f"unknown artifact format {fmt!r} (expected one of {ARTIFACT_FORMATS})")
    if method not in FORMAT_METHODS[fmt]:
        usable = [f for f in ARTIFACT_FORMATS if method in FORMAT_METHODS[f]]
        raise ArtifactFormatUnavailable(f"format {fmt!r} is not available for a {method} job; use one of {usable}")
    if rank is not None and fmt != "peft_lora":
        raise ConfigError(f"a rank applies to format 'peft_lora' only, not {fmt!r}", code="invalid_rank")
    if include_bases and fmt != "svfit":
        raise ConfigError(f"including bases applies to format 'svfit' only, not {fmt!r}", code="invalid_format")

    with atomic_dir(out_dir) as part:
        kept = None
        if fmt == "svfit" and include_bases and not read_adapter_config(adapter_dir).get("store_bases", True):
            model, _, _ = load_trained_model(base_model_path, adapter_dir, bases)
            model.basis_keys = {}  # saved without keys, it carries its bases
            save_svfit_adapter(model, part)
        elif fmt == "svfit":
            # The servable adapter already is this format: copy it as written.
            for name in _ADAPTER_FILES:
                shutil.copy2(adapter_dir / name, part / name)
        elif fmt == "peft_lora" and method in ("lora", "pissa"):
            # Already a PEFT LoRA: copied as written, or cut down when its rank is above ``rank``.
            truncate_peft_lora(adapter_dir, part, rank)
            kept = read_kept_energy(part)
        elif fmt == "peft_lora":
            model, _, _ = load_trained_model(base_model_path, adapter_dir, bases)
            export_peft_lora(model, part, rank=rank, dtype=checkpoint_dtype(base_model_path))
            kept = read_kept_energy(part)
        else:
            _write_merged(base_model_path, adapter_dir, method, part, bases)
        (part / TRAINING_META).write_text(json.dumps(meta, indent=2))
        extra = {"rank": rank, "kept_energy": kept["kept_energy"]} if kept is not None else {}
        _write_manifest(part, fmt, extra)
    return out_dir


def _write_merged(
    base_model_path: str | Path, adapter_dir: Path, method: str, out: Path, bases: BasisStore | None
) -> None:
    model, tokenizer, _ = load_trained_model(base_model_path, adapter_dir, bases)
    if method == "svfit":
        export_merged(model, tokenizer, out)
        return
    if method in ("lora", "pissa"):
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _write_manifest(folder: Path, fmt: str, extra: dict) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        files[str(path.relative_to(folder))] = digest.hexdigest()
    (folder / "manifest.json").write_text(json.dumps({"format": fmt, **extra, "sha256": files}, indent=2))
