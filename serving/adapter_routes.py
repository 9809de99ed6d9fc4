"""vLLM's dynamic-adapter protocol, which the API's router speaks to every replica: `/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`, and `/v1/models` listing the bases and loaded adapters; `/health` for probes and
`/replica` for operators (what its heartbeat says, with the engine's counters).

`lora_path` is the adapter's key in the shared store, or the absolute path of a PEFT LoRA folder as vLLM takes
it (so this replica can stand in for a vLLM server in tests); `base_model_name` says which base it applies to
(vLLM knows its one base).
"""

from __future__ import annotations

import time
from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from api.core.errors import UnknownModel
from serving.deps import ServedModelsDep, ServingToken

health_router = APIRouter(tags=["health"])
router = APIRouter(tags=["adapters"], dependencies=[ServingToken])


class LoadLoraAdapter(BaseModel):
    lora_name: str
    lora_path: str
    base_model_name: str | None = None


class UnloadLoraAdapter(BaseModel):
    lora_name: str


@health_router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraAdapter, served: ServedModelsDep) -> str:
    """Register (or refresh) an adapter under a name; its weights load with the first request that uses it."""
    served.load(body.lora_name, body.lora_path, body.base_model_name)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraAdapter, served: ServedModelsDep) -> str:
    if not served.unload(body.lora_name):
        raise UnknownModel(f"The LoRA adapter '{body.lora_name}' is not loaded.", param="lora_name")
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


@router.get("/v1/models")
async def list_models(served: ServedModelsDep) -> dict:
    created = int(time.time())
    data = [{"id": base, "object": "model", "created": created, "owned_by": "svfit", "parent": None}
            for base in served.bases()]
    data += [{"id": name, "object": "model", "created": created, "owned_by": "svfit", "parent": ref.base_id}
             for name, ref in served.adapters().items()]
    return {"object": "list", "data": data}


@router.get("/replica")
async def replica_state(request: Request) -> dict:
    return {**asdict(request.app.state.describe()), "engine_stats": request.app.state.inference.stats()}
