"""OpenAI's graders for the `/v1/fine_tuning/alpha/graders` routes, over the graders library: a grader is checked
(a GraderError becomes InvalidGrader, a 400 naming the field's full path with the library's code), the models
its model graders name are resolved (a reinforcement job's too: `check_job_grader_models`), and
`HostedModels.complete` asks those models through the inference router, the path a client's
`/v1/chat/completions` takes (api/routing), so a grader uses the organization's own hosted base models and
fine-tunes. (A training job's worker asks the same replicas itself: worker/grader_models.py.)

Grading blocks (text metrics, waiting on models), so the routes run it in a worker thread; `complete` runs in
that thread and hands each model call to the event loop, where the router's connections live.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import anyio.from_thread
from sqlalchemy.orm import Session

from api.core.base_checkpoints import list_base_models
from api.core.errors import InvalidGrader, ModelNotFound, ServingReplicaFailed
from api.core.replicas import live_replicas
from api.core.route_targets import RouteTarget, base_target, resolve_target
from api.core.settings import Settings
from api.routing.forwarder import Forwarder
from graders import CompiledGrader, GraderError, ModelAnswer, compile_grader, run_request
from graders.chat_calls import chat_body, model_answer


def compile_checked(grader: Any) -> CompiledGrader:
    """The grader of a request body, compiled; InvalidGrader naming the field if it cannot run."""
    try:
        return compile_grader(grader, "grader")
    except GraderError as exc:
        raise InvalidGrader.of(exc) from exc


def run_checked(body: Mapping[str, Any], complete: Any = None) -> dict:
    """OpenAI's run response for `{"grader", "model_sample", "item"}`; InvalidGrader for a request that cannot
    run. What the sample does (a model that fails, an answer with no score) is in the response, never raised."""
    try:
        return run_request(body, complete)
    except GraderError as exc:
        raise InvalidGrader.of(exc) from exc


def check_job_grader_models(session: Session, settings: Settings, org_id: str, grader: Mapping[str, Any]) -> None:
    """A reinforcement job's model graders must name models its workers can ask: one of the organization's own
    fine-tunes, or a base model this service has (in its models folder, or served by a live replica). A 400
    `model_not_found` naming that grader's `model` field otherwise, as /graders/validate answers. Whether a
    replica is up is the worker's to find out when it grades: a job may wait in the queue for longer."""
    fields = compile_grader(grader, "method.reinforcement.grader").model_fields()  # checked by job_spec already
    if not fields:
        return
    bases = {model.id for model in list_base_models(settings.models_dir)}
    bases.update(base for replica in live_replicas(session, settings.serving_replica_ttl_s)
                 for base in replica.servable_bases)
    for param, model in fields.items():
        if base_target(model) is None:  # a fine-tune or checkpoint id: the organization's own, or none
            known = resolve_target(session, org_id, model).adapter_key is not None
        else:
            known = model in bases
        if not known:
            raise ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.", param=param)


def fine_tune_targets(session: Session, org_id: str, models: Iterable[str]) -> dict[str, RouteTarget]:
    """Each `ft:` id's target for the organization, as an inference request's `model` resolves (another
    organization's fine-tune resolves as a base model no replica serves: not found)."""
    return {model: resolve_target(session, org_id, model) for model in models}


class HostedModels:
    """`complete` for the model graders of one request: each model already resolved to its target."""

    def __init__(self, forwarder: Forwarder, targets: Mapping[str, RouteTarget]) -> None:
        self.forwarder = forwarder
        self.targets = dict(targets)

    def complete(self, model: str, messages: list[dict], sampling_params: dict) -> ModelAnswer:
        """Runs in the grading thread (anyio's), so the request itself goes to the event loop."""
        body = chat_body(model, messages, sampling_params)
        try:
            status, content = anyio.from_thread.run(self.forwarder.ask, "chat/completions", body, self.targets[model])
        except ServingReplicaFailed as exc:
            if isinstance(exc.__cause__, TimeoutError):  # the replica went silent: unresponsive_reward_error
                raise TimeoutError(exc.message) from exc
            raise
        return model_answer(status, content)
