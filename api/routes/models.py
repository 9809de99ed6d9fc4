"""`/v1/models`: base models and the organization's fine-tunes. Ids hold ':' and '/', hence `{model:path}`."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentOrg, SessionDep, SettingsDep
from api.schemas import ModelDeleted, ModelPublic, ModelsPublic
from api.services import models as models_service

router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
def list_models(session: SessionDep, settings: SettingsDep, org_id: CurrentOrg) -> ModelsPublic:
    return ModelsPublic(data=models_service.list_models(session, org_id, settings.models_dir))


@router.get("/{model:path}")
def retrieve_model(session: SessionDep, settings: SettingsDep, org_id: CurrentOrg, model: str) -> ModelPublic:
    return models_service.get_model(session, org_id, model, settings.models_dir)


@router.delete("/{model:path}")
def delete_model(session: SessionDep, settings: SettingsDep, org_id: CurrentOrg, model: str) -> ModelDeleted:
    models_service.delete_model(session, org_id, model, settings.models_dir)
    return ModelDeleted(id=model)
