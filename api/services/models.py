"""The models an organization can use: the base models, and its own fine-tunes and checkpoints."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.base_checkpoints import list_base_models
from api.core.errors import NotFound, PermissionDenied
from api.core.tables import FineTunedModel, now
from api.schemas import ModelPublic

SYSTEM_OWNER = "system"


def _fine_tune_public(model: FineTunedModel) -> ModelPublic:
    return ModelPublic(id=model.id, created=model.created_at, owned_by=model.org_id, parent=model.parent)


def _live_fine_tune(session: Session, org_id: str, model_id: str) -> FineTunedModel | None:
    return session.scalar(
        select(FineTunedModel).where(
            FineTunedModel.id == model_id, FineTunedModel.org_id == org_id, FineTunedModel.deleted_at.is_(None)
        )
    )


def list_models(session: Session, org_id: str, models_dir: Path) -> list[ModelPublic]:
    base = [ModelPublic(id=m.id, created=m.created, owned_by=SYSTEM_OWNER) for m in list_base_models(models_dir)]
    fine_tunes = session.scalars(
        select(FineTunedModel)
        .where(FineTunedModel.org_id == org_id, FineTunedModel.deleted_at.is_(None))
        .order_by(FineTunedModel.pk)
    )
    return base + [_fine_tune_public(model) for model in fine_tunes]


def get_model(session: Session, org_id: str, model_id: str, models_dir: Path) -> ModelPublic:
    fine_tune = _live_fine_tune(session, org_id, model_id)
    if fine_tune is not None:
        return _fine_tune_public(fine_tune)
    for base in list_base_models(models_dir):
        if base.id == model_id:
            return ModelPublic(id=base.id, created=base.created, owned_by=SYSTEM_OWNER)
    raise NotFound(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")


def delete_model(session: Session, org_id: str, model_id: str, models_dir: Path) -> None:
    """Unregister a fine-tune or checkpoint. Its weights stay in the store; base models cannot be deleted."""
    fine_tune = _live_fine_tune(session, org_id, model_id)
    if fine_tune is None:
        if any(base.id == model_id for base in list_base_models(models_dir)):
            raise PermissionDenied(f"The base model '{model_id}' cannot be deleted.", param="model")
        raise NotFound(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    fine_tune.deleted_at = now()
    session.commit()
