"""Publishing a job's artifacts: checkpoint and final adapter directories in the store, the results CSV,
and the rows that make them servable and listable.

Every step is idempotent so a crash mid-publish followed by a retry never yields a second artifact or row:
directories are copied to `<key>.part` and committed into place in one step (a published key is never
rewritten), and rows are looked up by their natural key before insertion. A write that fails (a full disk) removes its
`.part` before the error propagates, so nothing half-written outlives it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from api.core.ids import new_id
from api.core.lineage import base_model_id
from api.core.storage import Storage
from api.core.tables import Checkpoint, File, FineTunedModel, Job, JobEvent
from worker import faults

# Written into every published directory; bump when the layout of what we publish changes.
PUBLISH_FORMAT_VERSION = 1
MANIFEST_NAME = "publish_manifest.json"

RESULTS_FILENAME = "step_metrics.csv"
RESULTS_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
# A DPO job's CSV has these too, each under its metrics events' key (worker/reporting.py); a supervised job's
# stays as it was.
DPO_RESULTS_COLUMNS = (
    "train_reward_margin", "train_chosen_reward", "train_rejected_reward",
    "valid_reward_margin", "valid_chosen_reward", "valid_rejected_reward",
)
# A reinforcement job's: the mean grade of each step's samples and of the validation samples, the KL estimate
# to the starting model and the answers' mean length.
REINFORCEMENT_RESULTS_COLUMNS = ("train_reward", "train_kl", "train_answer_tokens", "valid_reward")
# Where a CSV column's value comes from in a metrics event's data, where the names differ.
_RESULTS_SOURCES = {"train_accuracy": "train_mean_token_accuracy"}


def fine_tuned_model_name(job: Job, base_id: str | None = None) -> str:
    """`ft:{base}:{org}:{suffix}:{id}`, computed from the job (and, for a job continuing a fine-tune, its base
    model id `base_id`) so checkpoints can use it before success.

    The id part is the first 12 hex digits of the job id (48 bits: no practical collision within one
    org/base/suffix); an absent suffix leaves its field empty, as OpenAI does (`ft:base:org::id`).
    """
    short = job.id.removeprefix("ftjob-")[:12]
    return f"ft:{base_id or job.model}:{job.org_id}:{job.suffix or ''}:{short}"


def checkpoint_model_name(model_name: str, step: int) -> str:
    return f"{model_name}:ckpt-step-{step}"


def checkpoint_key(job_id: str, step: int) -> str:
    return f"jobs/{job_id}/checkpoints/step-{step}"


def final_key(job_id: str) -> str:
    return f"jobs/{job_id}/final"


def results_key(job_id: str) -> str:
    return f"jobs/{job_id}/{RESULTS_FILENAME}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_tree(src: Path, dst: Path) -> None:
    # Not shutil.copytree: after a failed file it carries on and raises one shutil.Error listing the
    # failures as text, which hides a full disk's errno from the job's error report.
    dst.mkdir()
    for path in sorted(src.rglob("*")):
        out = dst / path.relative_to(src)
        if path.is_dir():
            out.mkdir(exist_ok=True)
        else:
            shutil.copyfile(path, out)


# The fault-injection point (worker/faults.py) inside each kind of publish.
_FAULT_POINTS = {"checkpoint": "checkpoint_write", "final": "artifact_publish"}


def publish_dir(
    storage: Storage, src: Path, key: str, manifest: dict[str, Any], *, kind: str = "final"
) -> Path:
    """Copy directory `src` to store `key` atomically; a key already published is left as it is.

    The copy lands in the store's staging path `<key>.part` (any leftover from a crashed attempt is
    discarded first) together with a manifest (format version, sha256 per file), and `storage.commit`
    makes it visible in one step: a rename on a local store; on S3, an upload whose directory listing is
    written last. Readers therefore see either nothing or the whole directory. `kind` ("checkpoint" or
    "final") names what is published. Returns a local path of the published directory.
    """
    if storage.exists(key):
        return storage.path(key)
    part = storage.part_path(key)
    if part.exists():
        shutil.rmtree(part)
    try:
        _copy_tree(src, part)
        files = {
            str(p.relative_to(part)): _sha256(p) for p in sorted(part.rglob("*")) if p.is_file()
        }
        faults.point(_FAULT_POINTS[kind])
        body = {"format_version": PUBLISH_FORMAT_VERSION, **manifest, "files": files}
        (part / MANIFEST_NAME).write_text(json.dumps(body, indent=2, sort_keys=True))
        return storage.commit(key)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise


def ensure_checkpoint_rows(
    session: Session, job: Job, step: int, metrics: dict[str, Any], model_name: str, kind: str = "step"
) -> Checkpoint:
    """The Checkpoint row (`kind` "epoch" or "step") and its servable FineTunedModel row for `step`, inserted
    once."""
    key = checkpoint_key(job.id, step)
    ckpt_name = checkpoint_model_name(model_name, step)
    checkpoint = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step_number == step)
    ).one_or_none()
    if checkpoint is None:
        checkpoint = Checkpoint(
            id=new_id("ftckpt"), job_id=job.id, org_id=job.org_id, step_number=step, kind=kind, metrics=metrics,
            fine_tuned_model_checkpoint=ckpt_name, storage_key=key,
        )
        session.add(checkpoint)
    ensure_model_row(session, job, ckpt_name, key, step)
    return checkpoint


def superseded_checkpoints(
    session: Session, job_id: str, *, keep_epochs: int, keep_steps: int, resume_step: int | None
) -> list[Checkpoint]:
    """The job's checkpoints retention no longer keeps: all but the newest `keep_epochs` epoch checkpoints
    and the newest `keep_steps` step checkpoints (0 keeps every one of that kind). The checkpoint a resume
    would start from is always kept."""
    rows = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step_number.desc())
    ).all()
    superseded = []
    for kind, keep in (("epoch", keep_epochs), ("step", keep_steps)):
        of_kind = [row for row in rows if row.kind == kind]
        if keep:
            superseded += [row for row in of_kind[keep:] if row.step_number != resume_step]
    return superseded


def delete_checkpoints(session: Session, checkpoints: list[Checkpoint]) -> list[str]:
    """Delete the rows of `checkpoints` and of their servable models; returns the store keys to delete once
    this transaction has committed (a reader never finds a row whose files are gone)."""
    names = [row.fine_tuned_model_checkpoint for row in checkpoints]
    if names:
        session.execute(delete(FineTunedModel).where(FineTunedModel.id.in_(names)))
    for row in checkpoints:
        session.delete(row)
    return [row.storage_key for row in checkpoints]


def ensure_model_row(session: Session, job: Job, name: str, key: str, step: int | None) -> FineTunedModel:
    model = session.scalars(select(FineTunedModel).where(FineTunedModel.id == name)).one_or_none()
    if model is None:
        model = FineTunedModel(
            id=name, org_id=job.org_id, parent=base_model_id(session, job), job_id=job.id, step_number=step,
            storage_key=key
        )
        session.add(model)
    return model


def results_columns(method_type: str) -> tuple[str, ...]:
    extra = {"dpo": DPO_RESULTS_COLUMNS, "reinforcement": REINFORCEMENT_RESULTS_COLUMNS}.get(method_type, ())
    return RESULTS_COLUMNS + extra


def results_csv(session: Session, job_id: str, *, method_type: str = "supervised") -> bytes:
    """The step metrics CSV, built from the job's metrics events; `method_type` is the job's `method.type`.

    Events are the durable record across pauses and worker restarts. Steps re-run after a resume appear
    twice in the events; the later value wins, so the CSV has one row per step.
    """
    columns = results_columns(method_type)
    rows: dict[int, dict[str, Any]] = {}
    events = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "metrics").order_by(JobEvent.pk)
    )
    for event in events:
        data = event.data or {}
        if "step" not in data:
            continue
        row = rows.setdefault(int(data["step"]), {})
        for column in columns[1:]:
            source = _RESULTS_SOURCES.get(column, column)
            if data.get(source) is not None:
                row[column] = data[source]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for step in sorted(rows):
        row = rows[step]
        writer.writerow([step, *(_cell(row.get(c)) for c in columns[1:])])
    return out.getvalue().encode()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def ensure_results_file(session: Session, storage: Storage, job: Job) -> File:
    """The `fine-tune-results` File row for the job, with its CSV written atomically; created once."""
    key = results_key(job.id)
    existing = session.scalars(
        select(File).where(File.storage_key == key, File.purpose == "fine-tune-results")
    ).one_or_none()
    if existing is not None:
        return existing
    body = results_csv(session, job.id, method_type=(job.method or {}).get("type", "supervised"))
    part = storage.part_path(key)
    try:
        with part.open("wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    storage.commit(key)
    row = File(
        id=new_id("file"),
        org_id=job.org_id,
        filename=RESULTS_FILENAME,
        purpose="fine-tune-results",
        bytes=len(body),
        status="processed",
        data_format="csv",
        storage_key=key,
        sha256=hashlib.sha256(body).hexdigest(),
    )
    session.add(row)
    return row
