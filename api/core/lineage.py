"""Which fine-tune a job continues, and the base model under it.

A job's `model` is a base model id or, as OpenAI allows, one of the organization's own fine-tunes or checkpoints
(`ft:…`). A continued fine-tune trains further from that fine-tune's weights, with its method and spec, and what
it writes is again an adapter of the same base: every FineTunedModel row's `parent` is therefore a base model
id (worker/publishing.py), never another fine-tune, and one lookup reaches the base.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.errors import ModelNotFound
from api.core.tables import FineTunedModel, Job

# Every fine-tune and checkpoint id starts so (worker/publishing.py names them as OpenAI does).
FINE_TUNE_PREFIX = "ft:"


def starting_fine_tune(session: Session, org_id: str, model_id: str) -> FineTunedModel | None:
    """The fine-tune a job on `model_id` continues, or None for a base model id. Another organization's
    fine-tune, or a deleted one, is a 400 naming `model` exactly as a missing one is."""
    if not model_id.startswith(FINE_TUNE_PREFIX):
        return None
    row = session.scalar(select(FineTunedModel).where(
        FineTunedModel.id == model_id, FineTunedModel.org_id == org_id, FineTunedModel.deleted_at.is_(None)))
    if row is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
    return row


def base_model_id(session: Session, job: Job) -> str:
    """The base model under `job`: its `model`, or the base of the fine-tune it continues (deleted or not: a
    job already created keeps what it was created on)."""
    if not job.model.startswith(FINE_TUNE_PREFIX):
        return job.model
    parent = session.scalar(select(FineTunedModel.parent).where(FineTunedModel.id == job.model,
                                                                FineTunedModel.org_id == job.org_id))
    if parent is None:
        raise ModelNotFound(f"The model '{job.model}' this job continues no longer exists.", param="model")
    return parent


def starting_adapter_key(session: Session, job: Job) -> str | None:
    """Where in the store the adapter a continuing job starts from lies; None for a job on a base model."""
    if not job.model.startswith(FINE_TUNE_PREFIX):
        return None
    return session.scalar(select(FineTunedModel.storage_key).where(FineTunedModel.id == job.model,
                                                                   FineTunedModel.org_id == job.org_id))
