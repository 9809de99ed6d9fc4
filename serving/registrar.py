"""`svfit serving register`: puts an operator-run vLLM or SGLang server in the registry and keeps it there
while it answers. It beats on the server's behalf every `serving_heartbeat_s`: when `/health` answers, with
the adapters `/v1/models` lists; when it does not, it skips the beat, so the server ages out of routing.
"""

from __future__ import annotations

import time
import uuid

import httpx

from api.core.replicas import ReplicaState
from api.core.settings import Settings


class ExternalEngine:
    """How the registry sees one external server (the `describe` of its heartbeat)."""

    def __init__(self, settings: Settings, url: str, base: str, engine: str, max_loras: int, max_lora_rank: int):
        self.url = url.rstrip("/")
        self.base = base
        self.engine = engine
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.id = f"{engine}-{uuid.uuid4().hex[:12]}"
        self.started_at = time.time()
        headers = {"Authorization": f"Bearer {settings.serving_token}"} if settings.serving_token else {}
        self.client = httpx.Client(headers=headers, timeout=settings.serving_connect_timeout_s)

    def describe(self) -> ReplicaState | None:
        try:
            if self.client.get(f"{self.url}/health").status_code != 200:
                return None
            models = self.client.get(f"{self.url}/v1/models").json().get("data", [])
        except (httpx.HTTPError, ValueError):
            return None
        adapters = tuple(m["id"] for m in models if m.get("parent") and m.get("id") != self.base)
        return ReplicaState(
            id=self.id, url=self.url, engine=self.engine, device="external", servable_bases=(self.base,),
            loaded_bases=(self.base,), adapters=adapters, max_adapters=self.max_loras,
            max_lora_rank=self.max_lora_rank, started_at=self.started_at,
        )
