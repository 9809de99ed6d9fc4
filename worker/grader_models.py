"""The models a reinforcement job's model graders (score_model, label_model) ask, reached from the worker.

Each model is resolved once for the job's organization (a base model, or one of its own fine-tunes), then every
call goes straight to a serving replica of the registry with the serving token, chosen as the API's router
chooses (api/routing/pool.py): a replica that already holds the model first, then the least busy by its
heartbeat; one that cannot be reached is left out and the next one tried. A fine-tune the replica lacks is
loaded onto it first, as the router loads it (an external engine gets the LoRA export at the serving rank).

The worker goes to the replicas rather than through the API: it holds no organization's key, and the replicas
are where the API would send the call anyway. While no replica serves a model (one restarting), a call waits
up to `patience_s` for one to beat again before it fails. `complete` runs on grading threads, so the registry
view is shared under a lock; httpx's client is thread-safe.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import httpx

from api.core.db import session_scope
from api.core.errors import ModelNotFound, NoServingReplica
from api.core.lora_exports import lora_export_dir
from api.core.replicas import ReplicaState, live_replicas
from api.core.route_targets import RouteTarget, base_target, resolve_target
from api.core.settings import Settings
from api.core.storage import Storage
from graders import ModelAnswer
from graders.chat_calls import HostedModelError, chat_body, model_answer

log = logging.getLogger(__name__)

REFRESH_S = 1.0  # the registry is read at most this often
# How long a call waits for a replica serving its model to (re)appear: a replica restarting reloads its models.
PATIENCE_S = 60.0
# A replica whose queue is full answers 429/503 with Retry-After; the call is tried again this many times.
BUSY_RETRIES = 3
MAX_RETRY_AFTER_S = 5.0
UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


def grader_targets(org_id: str, fields: Mapping[str, str]) -> dict[str, RouteTarget]:
    """Each model the grader names (by its field's path), resolved for `org_id` as an inference request's
    model is. A fine-tune deleted since the job was created is a ModelNotFound naming that field."""
    targets: dict[str, RouteTarget] = {}
    with session_scope() as session:
        for param, model in fields.items():
            target = base_target(model)
            if target is None:  # a fine-tune or checkpoint id
                target = resolve_target(session, org_id, model)
                if target.adapter_key is None:
                    raise ModelNotFound(f"The grader's model '{model}' no longer exists.", param=param)
            targets[model] = target
    return targets


class GraderModels:
    """`complete(model, messages, sampling_params)` for one job's model graders (graders.CompleteFn)."""

    def __init__(self, settings: Settings, storage: Storage, targets: Mapping[str, RouteTarget], *,
                 patience_s: float = PATIENCE_S) -> None:
        self.settings = settings
        self.storage = storage
        self.targets = dict(targets)
        self.patience_s = patience_s
        self.client = httpx.Client(
            timeout=httpx.Timeout(settings.serving_read_timeout_s, connect=settings.serving_connect_timeout_s),
            headers={"Authorization": f"Bearer {settings.serving_token or ''}"},
        )
        self._lock = threading.Lock()
        self._replicas: list[ReplicaState] = []
        self._read_at = 0.0
        self._loaded: dict[str, set[str]] = {}  # replica id -> fine-tunes this job loaded onto it
        self._failed_at: dict[str, float] = {}  # replica id -> when a connection to it failed

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "GraderModels":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def complete(self, model: str, messages: list[dict], sampling_params: dict) -> ModelAnswer:
        target = self.targets[model]
        body = chat_body(model, messages, sampling_params)
        tried: set[str] = set()
        busy = 0
        deadline = time.monotonic() + self.patience_s
        while True:
            replica = self._choose_waiting(target, tried, deadline)
            try:
                response = self._ask(replica, target, body)
            except UNREACHABLE:
                self._mark_failed(replica)
                tried.add(replica.id)
                continue
            except httpx.TimeoutException as exc:  # the replica took the call and went silent
                raise TimeoutError(f"no answer within {self.settings.serving_read_timeout_s:g} s") from exc
            if response.status_code in (429, 503) and busy < BUSY_RETRIES:
                busy += 1
                time.sleep(_retry_after(response))
                continue
            return model_answer(response.status_code, response.content)

    # --- choosing a replica ---------------------------------------------------------------------------------

    def _choose_waiting(self, target: RouteTarget, tried: set[str], deadline: float) -> ReplicaState:
        """A replica for `target`; while there is none, the registry is read again until `deadline`."""
        while True:
            try:
                return self._choose(target, tried)
            except NoServingReplica:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(REFRESH_S)
                tried.clear()  # a replica that failed may have come back: its newer beat says so

    def _choose(self, target: RouteTarget, tried: set[str]) -> ReplicaState:
        replicas = self._live()
        servers = [r for r in replicas if target.base_id in r.servable_bases]
        if not servers:
            raise NoServingReplica(f"No running serving replica serves the base model '{target.base_id}'.")
        with self._lock:
            candidates = [r for r in servers if r.id not in tried
                          and (r.id not in self._failed_at or r.beat_at > self._failed_at[r.id])]
            holders = [r for r in candidates if self._holds(r, target)]
        if not candidates:
            raise NoServingReplica("Every serving replica that could answer the grader failed.")
        pool = holders or candidates
        random.shuffle(pool)  # ties go anywhere, not always to the oldest replica
        return min(pool, key=lambda r: r.in_flight)

    def _live(self) -> list[ReplicaState]:
        with self._lock:
            if time.monotonic() - self._read_at >= REFRESH_S:
                with session_scope() as session:
                    self._replicas = live_replicas(session, self.settings.serving_replica_ttl_s)
                self._read_at = time.monotonic()
            return list(self._replicas)

    def _holds(self, replica: ReplicaState, target: RouteTarget) -> bool:
        if target.adapter_key is None:
            return target.base_id in replica.loaded_bases
        return target.model_id in replica.adapters or target.model_id in self._loaded.get(replica.id, ())

    def _mark_failed(self, replica: ReplicaState) -> None:
        with self._lock:
            self._failed_at[replica.id] = time.time()
            self._read_at = 0.0  # read the registry again on the next call

    # --- asking it ------------------------------------------------------------------------------------------

    def _ask(self, replica: ReplicaState, target: RouteTarget, body: bytes) -> httpx.Response:
        """The replica's answer to the chat completion; a fine-tune is loaded first if this job has not seen
        it there, and once more if the replica answers 404 (it restarted, or its own limit unloaded it)."""
        for attempt in range(2):
            if target.adapter_key is not None and not self._holds(replica, target):
                self._load(replica, target)
            response = self.client.post(f"{replica.url}/v1/chat/completions", content=body,
                                        headers={"Content-Type": "application/json"})
            if response.status_code == 404 and target.adapter_key is not None and attempt == 0:
                with self._lock:
                    self._loaded.get(replica.id, set()).discard(target.model_id)
                replica = _without_adapter(replica, target.model_id)
                continue
            return response
        raise AssertionError("unreachable: the second attempt always returns")

    def _load(self, replica: ReplicaState, target: RouteTarget) -> None:
        """vLLM's load_lora_adapter, as the router sends it: our replicas read the adapter folder from the store
        by key; an external engine gets a PEFT LoRA folder exported at the serving rank."""
        path: Any = target.adapter_key
        if replica.engine != "native":
            rank = min(self.settings.serving_lora_rank, replica.max_lora_rank or self.settings.serving_lora_rank)
            path = str(lora_export_dir(self.storage, self.settings, target, rank))
        answer = self.client.post(f"{replica.url}/v1/load_lora_adapter", json={
            "lora_name": target.model_id, "lora_path": path, "base_model_name": target.base_id})
        already = answer.status_code == 400 and "already" in answer.text  # vLLM's answer to a second load
        if answer.status_code != 200 and not already:
            raise HostedModelError(f"loading {target.model_id} failed: {answer.status_code} {answer.text[:200]}")
        with self._lock:
            self._loaded.setdefault(replica.id, set()).add(target.model_id)


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(response.headers.get("retry-after", 1.0))))
    except ValueError:
        return 1.0


def _without_adapter(replica: ReplicaState, model_id: str) -> ReplicaState:
    """The replica as seen after it said it lacks `model_id` (its heartbeat may still list it)."""
    return replace(replica, adapters=tuple(a for a in replica.adapters if a != model_id))


def job_grader_models(settings: Settings, storage: Storage, org_id: str,
                      fields: Mapping[str, str]) -> GraderModels | None:
    """The hosted models of a job's model graders (`fields`: model by field path), or None when it has none."""
    if not fields:
        return None
    return GraderModels(settings, storage, grader_targets(org_id, fields))
