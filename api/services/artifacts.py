"""Downloadable artifacts of a job (extension): the final adapter or a checkpoint, exported by the training
library in one of its formats and packed as a tar.gz with a sha256. ``peft_lora`` comes at a serving rank
(LoRA servers load ranks up to a limit), with the share of the update's energy that rank kept.

Each archive (per format, and per rank for ``peft_lora``) is built once and cached in the store. The build
runs under a per-archive file lock (two requests, or two API processes, never build the same archive twice)
and lands atomically: the kept energy and the digest are written first, then the archive is renamed into
place, so an archive that exists always has its digest (and a `peft_lora` one its kept energy).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.base_checkpoints import resolve_base_model
from api.core.lineage import base_model_id
from api.core.basis_store import StoredBases
from api.core.errors import ArtifactUnavailable, InvalidParameter, ModelNotFound
from api.core.job_states import JobStatus
from api.core.settings import MAX_SERVING_LORA_RANK, Settings
from api.core.storage import Storage
from api.core.tables import Checkpoint, FineTunedModel, Job
from api.services.jobs import get_job
from svfit_core.training.layout import ARTIFACT_FORMATS, checkpoint_dir_name
# Safetensors weights barely compress; level 1 keeps a merged model's archive from costing minutes.
GZIP_LEVEL = 1


@dataclass(frozen=True)
class ArtifactArchive:
    path: Path
    sha256: str
    filename: str
    kept_energy: float | None = None  # `peft_lora`: the share of ‖ΔW‖²_F its rank kept


class _HashingWriter:
    """A write-only file object that hashes what passes through it on the way to `raw`."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def _adapter_key(session: Session, job: Job, step: int | None) -> tuple[str, str]:
    """(storage key of the adapter directory, a label for names): checkpoint `step`, or the final adapter."""
    if step is not None:
        checkpoint = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step_number == step))
        if checkpoint is None:
            raise ArtifactUnavailable(f"Job {job.id} has no checkpoint at step {step}.", param="step")
        return checkpoint.storage_key, checkpoint_dir_name(step)
    if job.status != JobStatus.SUCCEEDED:
        raise ArtifactUnavailable(
            f"Job {job.id} has not succeeded (status: {job.status}); pass `step` to download a checkpoint."
        )
    final = session.scalar(
        select(FineTunedModel).where(FineTunedModel.job_id == job.id, FineTunedModel.step_number.is_(None))
    )
    if final is None:
        raise ArtifactUnavailable(f"Job {job.id} has no final adapter.")
    return final.storage_key, "final"


def _write_tar_gz(source: Path, target: Path, root_name: str) -> str:
    """Pack `source` (a directory's contents, or one file) under `root_name/`; return the archive's sha256."""
    with target.open("wb") as raw:
        hashing = _HashingWriter(raw)
        with gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                if source.is_dir():
                    for path in sorted(source.rglob("*")):
                        tar.add(path, arcname=f"{root_name}/{path.relative_to(source).as_posix()}", recursive=False)
                else:
                    tar.add(source, arcname=f"{root_name}/{source.name}")
        raw.flush()
        os.fsync(raw.fileno())
    return hashing.digest.hexdigest()


def _kept_energy_file(archive: Path) -> Path:
    return archive.with_name(archive.name + ".kept_energy")


def _build(
    base_model_path: Path, adapter_dir: Path, fmt: str, rank: int | None, include_basis: bool, storage: Storage,
    archive: Path, digest_file: Path, root_name: str,
) -> None:
    # Imported on use: the training library pulls in torch, which only this route needs.
    from svfit_core.training.outputs import ArtifactFormatUnavailable, write_artifact

    with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".build-") as scratch:
        try:
            exported = Path(write_artifact(
                base_model_path, adapter_dir, fmt, Path(scratch) / root_name, rank=rank,
                bases=StoredBases(storage), include_bases=include_basis,
            ))
        except ArtifactFormatUnavailable as exc:
            raise ArtifactUnavailable(str(exc), param="format") from exc
        part = Path(scratch) / "archive.part"
        sha256 = _write_tar_gz(exported, part, root_name)
        if fmt == "peft_lora":
            # Kept beside the archive: a cached archive answers without being opened.
            kept_part = Path(scratch) / "kept_energy.part"
            kept_part.write_text(f"{json.loads((exported / 'manifest.json').read_text())['kept_energy']!r}\n")
            os.replace(kept_part, _kept_energy_file(archive))
        digest_part = Path(scratch) / "digest.part"
        digest_part.write_text(sha256 + "\n")
        os.replace(digest_part, digest_file)
        os.replace(part, archive)


def _lora_rank(fmt: str, rank: int | None, default: int) -> int | None:
    """The rank a `peft_lora` archive is built at (default `default`, the serving rank); other formats take none."""
    if fmt != "peft_lora":
        if rank is not None:
            raise InvalidParameter("'rank' applies only to format 'peft_lora'.", param="rank")
        return None
    rank = default if rank is None else rank
    if not 1 <= rank <= MAX_SERVING_LORA_RANK:
        raise InvalidParameter(f"'rank' must be an integer from 1 to {MAX_SERVING_LORA_RANK}.", param="rank")
    return rank


def artifact_archive(
    session: Session,
    storage: Storage,
    settings: Settings,
    *,
    org_id: str,
    job_id: str,
    fmt: str,
    step: int | None = None,
    rank: int | None = None,
    include_basis: bool = False,
) -> ArtifactArchive:
    """The cached archive of job `job_id`'s adapter in format `fmt` (`peft_lora`: at rank `rank`, default
    settings.serving_lora_rank; `svfit`: compact, σ and the keys of its bases, or with `include_basis` self-contained),
    built on first request (slow: call it off the event loop)."""
    if fmt not in ARTIFACT_FORMATS:
        raise InvalidParameter(f"'format' must be one of {', '.join(ARTIFACT_FORMATS)}.", param="format")
    rank = _lora_rank(fmt, rank, settings.serving_lora_rank)
    if include_basis and fmt != "svfit":
        raise InvalidParameter("'include_basis' applies only to format 'svfit'.", param="include_basis")
    job = get_job(session, org_id, job_id)
    adapter_key, label = _adapter_key(session, job, step)
    # The rank is part of the name, hence of the cache key: each rank is its own archive.
    root_name = f"{job.id}-{label}-{fmt}" + (f"-r{rank}" if rank is not None else "") + (
        "-with-bases" if include_basis else ""
    )
    archive = storage.path(f"artifacts/{job.id}/{root_name}.tar.gz")
    digest_file = archive.with_name(archive.name + ".sha256")

    if not archive.exists():
        archive.parent.mkdir(parents=True, exist_ok=True)
        with archive.with_name(archive.name + ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not archive.exists():  # another builder may have finished while we waited
                adapter_dir = storage.path(adapter_key)
                if not adapter_dir.exists():
                    raise ArtifactUnavailable(f"The adapter of job {job.id} ({label}) is missing from the store.")
                try:
                    base_model_path = resolve_base_model(base_model_id(session, job), settings.models_dir)
                except ModelNotFound as exc:
                    raise ArtifactUnavailable(f"The base model '{job.model}' is no longer installed.") from exc
                _build(base_model_path, adapter_dir, fmt, rank, include_basis, storage, archive, digest_file,
                       root_name)
    kept_energy = float(_kept_energy_file(archive).read_text()) if rank is not None else None
    return ArtifactArchive(
        path=archive, sha256=digest_file.read_text().strip(), filename=f"{root_name}.tar.gz", kept_energy=kept_energy
    )
