"""Request and response bodies of the HTTP API, named by role (`JobCreate`, `JobPublic`, `JobsPublic`).

Field names and shapes follow the OpenAI API as the official client reads them (shared/API.md); the
extensions (`peft`, `progress`, `queue_position`) are extra keys the client keeps as attributes. Objects a
strict client expects are never emitted as null: `hyperparameters`, `progress`, `result_files`.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from api.core import tables
from api.core.job_states import JobStatus

T = TypeVar("T")

# A number or "auto": typed loosely on purpose, so that api/core/job_spec.py (not a pydantic union
# error) reports a bad value, naming the exact field.
NUMBER_OR_AUTO = {"anyOf": [{"type": "number"}, {"type": "string", "enum": ["auto"]}]}


class ListPublic(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None
    last_id: str | None

    @classmethod
    def of(cls, items: list[Any], has_more: bool) -> "ListPublic[T]":
        return cls(
            data=items,
            has_more=has_more,
            first_id=items[0].id if items else None,
            last_id=items[-1].id if items else None,
        )


# --- files ---------------------------------------------------------------------------------------------


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None

    @classmethod
    def from_row(cls, file: tables.File) -> "FilePublic":
        return cls(
            id=file.id,
            bytes=file.bytes,
            created_at=file.created_at,
            filename=file.filename,
            purpose=file.purpose,
            status=file.status,
            status_details=file.status_details,
        )


class FilesPublic(ListPublic[FilePublic]):
    pass


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# --- fine-tuning jobs: requests ------------------------------------------------------------------------


class HyperparametersRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    n_epochs: Any = Field(default="auto", json_schema_extra=NUMBER_OR_AUTO)
    batch_size: Any = Field(default="auto", json_schema_extra=NUMBER_OR_AUTO)
    learning_rate_multiplier: Any = Field(default="auto", json_schema_extra=NUMBER_OR_AUTO)


class SupervisedMethodRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    hyperparameters: HyperparametersRequest | None = None


class DpoHyperparametersRequest(HyperparametersRequest):
    beta: Any = Field(
        default="auto",
        json_schema_extra=NUMBER_OR_AUTO,
        description="How far the model may move from the starting model per unit of preference (auto: 0.1).",
    )


class DpoMethodRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    hyperparameters: DpoHyperparametersRequest | None = None


# OpenAI's reasoning efforts for a reinforcement job's hyperparameters (no "auto": unset is "default").
REASONING_EFFORTS = ["default", "low", "medium", "high"]


class ReinforcementHyperparametersRequest(HyperparametersRequest):
    compute_multiplier: Any = Field(default="auto", json_schema_extra=NUMBER_OR_AUTO)
    eval_interval: Any = Field(default="auto", json_schema_extra=NUMBER_OR_AUTO)
    eval_samples: Any = Field(default="auto", json_schema_extra=NUMBER_OR_AUTO)
    reasoning_effort: Any = Field(default=None, json_schema_extra={"type": "string", "enum": REASONING_EFFORTS})


class ReinforcementMethodRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # An object, checked by the graders library (api/core/job_spec.py), which names the exact field.
    grader: dict[str, Any] | None = Field(
        default=None, description="The grader: string_check, text_similarity, score_model, label_model or multi."
    )
    hyperparameters: ReinforcementHyperparametersRequest | None = None


class MethodRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # A plain string, so that api/core/job_spec.py names an unknown one in its own words.
    type: str = Field(description='"supervised", "dpo" (preference data) or "reinforcement" (prompts, graded samples).')
    supervised: SupervisedMethodRequest | None = None
    dpo: DpoMethodRequest | None = None
    reinforcement: ReinforcementMethodRequest | None = None


class PeftRequest(BaseModel):
    """Extension (send with `extra_body={"peft": {...}}`): which parameter-efficient method trains the job.

    Extra keys are kept for api/core/job_spec.py, which admits the training options it knows
    (`max_seq_length`, `checkpoint_every`, ...) and drops the rest.
    """

    model_config = ConfigDict(extra="allow")

    type: str | None = Field(default=None, description='"svfit" (default), "lora" or "full".')
    rank: Any = Field(default=None, description="svfit: singular values kept per matrix; lora: the LoRA rank.")
    energy: Any = Field(default=None, description="svfit: keep the top singular values holding this energy share.")
    band: Any = Field(default=None, description="svfit: also train this many off-diagonals (0-8) on each side "
                      "of the singular-value coupling (SVFT's banded variant; default 0).")
    alpha: Any = Field(default=None, description="lora: lora_alpha (default 2 x rank).")
    target_modules: Any = Field(default=None, description='Module names, or "all-linear"; default: per model.')


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    hyperparameters: HyperparametersRequest | None = None
    method: MethodRequest | None = None
    peft: PeftRequest | None = None


# --- fine-tuning jobs: responses -----------------------------------------------------------------------


class HyperparametersPublic(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float | None = Field(default=None, description="Extension: the absolute learning rate.")
    beta: float | None = Field(default=None, description="DPO jobs only: DPO's beta.")
    compute_multiplier: float | None = Field(
        default=None, description="Reinforcement jobs only: scales the answers sampled per prompt (4 at 1.0).")
    eval_interval: int | None = Field(default=None, description="Reinforcement jobs only: steps between evaluations.")
    eval_samples: int | None = Field(default=None, description="Reinforcement jobs only: answers per validation prompt.")
    reasoning_effort: str | None = Field(default=None, description="Reinforcement jobs only: echoed, not used.")

    @model_serializer(mode="wrap")
    def _method_fields_only_for_their_method(self, handler):  # noqa: ANN001, ANN202 - pydantic's serializer protocol
        # A supervised job's object stays as it was: no `beta` (or reinforcement) key rather than a null one.
        data = handler(self)
        if isinstance(data, dict):
            for name in ("beta", "compute_multiplier", "eval_interval", "eval_samples", "reasoning_effort"):
                if data.get(name) is None:
                    data.pop(name, None)
        return data


class JobErrorPublic(BaseModel):
    code: str
    message: str
    param: str | None = None


class ProgressPublic(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = 0
    seconds_remaining: float | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    model: str
    organization_id: str
    status: JobStatus
    training_file: str
    validation_file: str | None
    seed: int
    hyperparameters: HyperparametersPublic
    method: dict[str, Any]
    result_files: list[str]
    fine_tuned_model: str | None
    finished_at: int | None
    trained_tokens: int | None
    error: JobErrorPublic | None
    estimated_finish: int | None
    metadata: dict[str, str] | None
    user_provided_suffix: str | None = None
    # Extensions.
    peft: dict[str, Any]
    progress: ProgressPublic
    queue_position: int | None = Field(description="1 = next to start; null unless queued.")

    @classmethod
    def from_row(cls, job: tables.Job, queue_position: int | None = None) -> "JobPublic":
        error = job.error or None
        progress = job.progress or {}
        return cls(
            id=job.id,
            created_at=job.created_at,
            model=job.model,
            organization_id=job.org_id,
            status=job.status,
            training_file=job.training_file,
            validation_file=job.validation_file,
            seed=job.seed,
            hyperparameters=HyperparametersPublic(**job.hyperparameters),
            method=job.method,
            result_files=list(job.result_files or []),
            # The worker may register the model a moment before it flips the status; the id is
            # promised to the client only once the job has succeeded.
            fine_tuned_model=job.fine_tuned_model if job.status == JobStatus.SUCCEEDED else None,
            finished_at=job.finished_at,
            trained_tokens=job.trained_tokens,
            error=JobErrorPublic(
                code=error.get("code") or "internal_error",
                message=error.get("message") or "The job failed.",
                param=error.get("param"),
            )
            if error
            else None,
            estimated_finish=job.estimated_finish,
            metadata=job.user_metadata,
            user_provided_suffix=job.suffix,
            peft=job.peft,
            progress=ProgressPublic(**{k: v for k, v in progress.items() if k in ProgressPublic.model_fields}),
            queue_position=queue_position,
        )


class JobsPublic(ListPublic[JobPublic]):
    pass


class JobEventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, event: tables.JobEvent) -> "JobEventPublic":
        return cls(
            id=event.id,
            created_at=event.created_at,
            level=event.level,
            message=event.message,
            type=event.type,
            data=event.data,
        )


class JobEventsPublic(ListPublic[JobEventPublic]):
    pass


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]

    @classmethod
    def from_row(cls, checkpoint: tables.Checkpoint) -> "CheckpointPublic":
        return cls(
            id=checkpoint.id,
            created_at=checkpoint.created_at,
            fine_tuned_model_checkpoint=checkpoint.fine_tuned_model_checkpoint,
            fine_tuning_job_id=checkpoint.job_id,
            step_number=checkpoint.step_number,
            metrics=checkpoint.metrics or {},
        )


class CheckpointsPublic(ListPublic[CheckpointPublic]):
    pass


# --- graders (OpenAI's /fine_tuning/alpha/graders) ----------------------------------------------------


class GraderValidateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    grader: dict[str, Any] = Field(
        description="string_check, text_similarity, score_model, label_model or multi (python is refused).",
        examples=[{"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                   "reference": "{{item.answer}}", "operation": "eq"}],
    )


class GraderRunRequest(GraderValidateRequest):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model_sample: str = Field(description="The model's answer: the `sample` namespace (`output_json` if it is JSON).")
    item: Any = Field(default=None, description="The dataset row: the `item` namespace.")


class GraderValidatePublic(BaseModel):
    grader: dict[str, Any] = Field(description="The grader, as sent.")


class GraderRunErrorsPublic(BaseModel):
    """OpenAI's `metadata.errors`: one flag per way a sample can fail to be graded (the reward is then 0)."""

    model_config = ConfigDict(protected_namespaces=())

    formula_parse_error: bool
    invalid_variable_error: bool
    model_grader_parse_error: bool
    model_grader_refusal_error: bool
    model_grader_server_error: bool
    model_grader_server_error_details: str | None = None
    other_error: bool
    python_grader_runtime_error: bool
    python_grader_runtime_error_details: str | None = None
    python_grader_server_error: bool
    python_grader_server_error_type: str | None = None
    sample_parse_error: bool
    truncated_observation_error: bool
    unresponsive_reward_error: bool


class GraderRunErrorDetail(BaseModel):
    flag: str
    message: str
    grader: str = Field(description="The path of the grader that failed (`grader.graders.judge`).")


class GraderRunMetadataPublic(BaseModel):
    name: str
    type: str
    errors: GraderRunErrorsPublic
    execution_time: float
    scores: dict[str, float] = Field(description="Every sub-grader's reward, by dotted key.")
    token_usage: int | None = None
    sampled_model_name: str | None = None
    error_details: list[GraderRunErrorDetail] = Field(
        default_factory=list, description="Extension: each failure's flag, message and grader path."
    )


class GraderRunPublic(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    reward: float
    metadata: GraderRunMetadataPublic
    sub_rewards: dict[str, float]
    model_grader_token_usage_per_model: dict[str, dict[str, int]]


# --- models --------------------------------------------------------------------------------------------


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None


class ModelsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# --- errors (documentation of the envelope in /docs) ---------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    error: ErrorBody
