"""Which weights an inference request's model id names for an organization: a base model, or a fine-tune
(`ft:…`) or checkpoint (`…:ckpt-step-N`) through the organization's FineTunedModel rows to its adapter in the
store. Another organization's fine-tune answers exactly as a missing one: existence is not leaked. Read by the
API's router and by a worker whose job's model graders ask hosted models.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.lineage import FINE_TUNE_PREFIX
from api.core.tables import FineTunedModel


@dataclass(frozen=True)
class RouteTarget:
    """A base model (`adapter_key` None) or a fine-tune of `base_id` whose adapter folder is `adapter_key`."""

    model_id: str
    base_id: str
    adapter_key: str | None = None




def base_target(model_id: str) -> RouteTarget | None:
    """The target of an id that cannot name a fine-tune (a base model, or nothing), with no database read:
    most requests name a base or a fine-tune, and a base's needs no lookup."""
    return None if model_id.startswith(FINE_TUNE_PREFIX) else RouteTarget(model_id=model_id, base_id=model_id)


def resolve_target(session: Session, org_id: str, model_id: str) -> RouteTarget:
    """A fine-tune row of `org_id`, or else the id taken as a base model (the replicas say if one exists)."""
    row = session.scalar(
        select(FineTunedModel).where(
            FineTunedModel.id == model_id, FineTunedModel.org_id == org_id, FineTunedModel.deleted_at.is_(None)
        )
    )
    if row is None:
        return RouteTarget(model_id=model_id, base_id=model_id)
    return RouteTarget(model_id=model_id, base_id=row.parent, adapter_key=row.storage_key)
