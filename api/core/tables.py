"""Database tables (SQLAlchemy 2.x). The job row is the source of truth for job state.

Every table has an integer `pk` that only grows: cursor pagination orders by it, so `after=<id>` is a
single indexed comparison. Public ids (`file-…`, `ftjob-…`) are separate unique strings. Timestamps are
integer Unix seconds, as the OpenAI API reports them.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Organization(Base):
    __tablename__ = "organizations"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    # Unique so that get-or-create by name (the default org, `svfit keys create --org NAME`) cannot race
    # into two organizations with one name.
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class ApiKey(Base):
    """Keys are stored as sha256 hashes; the plaintext is shown once at creation."""

    __tablename__ = "api_keys"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class File(Base):
    __tablename__ = "files"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))  # uploaded | processed | error
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    data_format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    num_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    storage_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("org_id", "idempotency_key", name="uq_jobs_org_idempotency"),
        Index("ix_jobs_status_pk", "status", "pk"),
    )
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)
    peft: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(32), index=True)  # a JobStatus (api/core/job_states.py)
    # A pause/cancel the worker has not acted on yet; the worker polls it every step.
    requested_action: Mapped[str | None] = mapped_column(String(16), nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # Crash recovery: the worker that holds the job beats every few seconds; a stale beat re-queues it.
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    last_checkpoint_step: Mapped[int | None] = mapped_column(Integer, nullable=True)


class JobEvent(Base):
    __tablename__ = "job_events"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(8))  # info | warn | error
    type: Mapped[str] = mapped_column(String(16))  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step_number", name="uq_checkpoints_job_step"),)
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    org_id: Mapped[str] = mapped_column(String(64), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    # "epoch": taken because an epoch ended; "step": by `checkpoint_every` or a pause. Retention keeps the
    # newest few of each (settings.checkpoint_keep_epochs / checkpoint_keep_steps).
    kind: Mapped[str] = mapped_column(String(8), default="step", server_default="step")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(512), unique=True)
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class FineTunedModel(Base):
    """A servable fine-tune or checkpoint. DELETE /v1/models/{id} marks it deleted; the weights stay."""

    __tablename__ = "fine_tuned_models"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(512), unique=True)
    org_id: Mapped[str] = mapped_column(String(64), index=True)
    parent: Mapped[str] = mapped_column(String(256))  # the base model id
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step_number: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: the final model
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    deleted_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ServingReplica(Base):
    """A serving replica as its last heartbeat described it: where it answers, what it runs and holds.

    A native replica (`svfit serving`) writes its own row; an external vLLM/SGLang server gets one from the
    `svfit serving register` process that watches it. Rows whose `beat_at` is older than the TTL are ignored
    by the router and deleted by the next replica that beats.
    """

    __tablename__ = "serving_replicas"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    url: Mapped[str] = mapped_column(String(512))  # base URL, without /v1
    engine: Mapped[str] = mapped_column(String(16))  # "native", "vllm" or "sglang"
    device: Mapped[str] = mapped_column(String(32))
    servable_bases: Mapped[list[Any]] = mapped_column(default=list)  # base model ids it can load
    loaded_bases: Mapped[list[Any]] = mapped_column(default=list)  # base model ids in its memory now
    adapters: Mapped[list[Any]] = mapped_column(default=list)  # adapter names loaded (load_lora_adapter)
    max_adapters: Mapped[int] = mapped_column(Integer)
    max_lora_rank: Mapped[int | None] = mapped_column(Integer, nullable=True)  # external engines' limit
    free_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    in_flight: Mapped[int] = mapped_column(Integer, default=0)  # requests it is answering
    started_at: Mapped[float] = mapped_column(Float)
    beat_at: Mapped[float] = mapped_column(Float, index=True)
