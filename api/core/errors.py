"""The one error table. Services raise these; the API turns them into OpenAI's error envelope.

Each class fixes the HTTP status, the envelope `type` and a stable `code`; an instance adds the message
and the offending parameter. Codes are part of the public contract: never rename one.
"""

from __future__ import annotations

import math


class ServiceError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self, message: str, param: str | None = None, *, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        # Response headers that belong to the error (Retry-After on a 429); plain strings, no HTTP types here.
        self.headers = dict(headers or {})
        if code is not None:
            self.code = code

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ServiceError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class InvalidParameter(InvalidRequest):
    code = "invalid_parameter"


class MissingParameter(InvalidRequest):
    code = "missing_parameter"


class ModelNotFound(InvalidRequest):
    """An unknown model where a request names one to build on (job creation, a model grader's `model`): 400,
    per OpenAI."""

    code = "model_not_found"


class InvalidGrader(InvalidRequest):
    """A grader that cannot be run (`/v1/fine_tuning/alpha/graders/*`, a reinforcement job's grader), naming the
    field's full path. The code is the graders library's (graders/errors.py): invalid_grader, invalid_template,
    invalid_formula, grader_not_supported, grader_too_large, or invalid_parameter / missing_parameter for the
    request around the grader."""

    code = "invalid_grader"

    @classmethod
    def of(cls, exc: Exception) -> "InvalidGrader":
        """The 400 for a graders.GraderError (read by its attributes: the core imports no library for this)."""
        return cls(getattr(exc, "message", str(exc)), getattr(exc, "param", None), code=getattr(exc, "code", None))


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested completion do not fit the model's context window."""

    code = "context_length_exceeded"


class WrongModelTask(InvalidRequest):
    """A chat/completion request to a classifier, or a classification request to a language model."""

    code = "invalid_model"


class ModelNotGenerative(WrongModelTask):
    """A chat or completion request to a model that generates no text: an encoder base, or a classifier."""

    code = "model_not_generative"


class UnsupportedParameter(InvalidRequest):
    """An OpenAI request parameter this service does not serve yet (tools, structured outputs): refused, so a
    client never takes a plain-text answer for one that honoured it."""

    code = "unsupported_parameter"


class WrongInputKind(InvalidRequest):
    """A text pair to a classifier trained on single texts, or a single text to one trained on pairs."""

    code = "invalid_input_kind"


class InvalidTrainingFile(InvalidRequest):
    code = "invalid_training_file"


class InvalidStateTransition(InvalidRequest):
    """A permanent conflict (cancel a finished job). 400, not 409: the client retries 409."""

    code = "invalid_state"


class ArtifactUnavailable(InvalidRequest):
    code = "artifact_unavailable"


class Unauthorized(ServiceError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class PermissionDenied(ServiceError):
    status, type, code = 403, "invalid_request_error", "permission_denied"


class NotFound(ServiceError):
    """Also what another organization's id answers: existence is not leaked."""

    status, type, code = 404, "invalid_request_error", "not_found"


class UnknownModel(NotFound):
    """An inference request names no model this organization can use: 404, `param: "model"`, as OpenAI."""

    code = "model_not_found"


class MethodNotAllowed(ServiceError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class PayloadTooLarge(ServiceError):
    status, type, code = 413, "invalid_request_error", "file_too_large"


class Unprocessable(ServiceError):
    status, type, code = 422, "invalid_request_error", "unprocessable_entity"


class RateLimited(ServiceError):
    """Too many requests of one kind from one API key. Carries `Retry-After` (the client waits, then retries)."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float):
        # Whole seconds for Retry-After (RFC 9110); retry-after-ms is what the openai client reads first.
        seconds, milliseconds = max(1, math.ceil(retry_after_s)), max(1, math.ceil(retry_after_s * 1000))
        super().__init__(message, headers={"Retry-After": str(seconds), "retry-after-ms": str(milliseconds)})
        self.retry_after_s = retry_after_s


class ServiceUnavailable(ServiceError):
    """A dependency (database, job queue) is down or busy: transient, so it carries `Retry-After`."""

    status, type, code = 503, "server_error", "service_unavailable"
    retry_after_s = 2

    def __init__(
        self, message: str, param: str | None = None, *, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message, param, code=code, headers={"Retry-After": str(self.retry_after_s), **(headers or {})})


class NoServingReplica(ServiceUnavailable):
    """No live serving replica can take the request (none registered, or every one that could failed)."""

    code = "no_serving_replica"


class ServingReplicaFailed(ServiceError):
    """The replica answering a request went away before the answer was whole (502; retry goes elsewhere)."""

    status, type, code = 502, "server_error", "serving_replica_failed"
    retry_after_s = 1

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param, headers={"Retry-After": str(self.retry_after_s)})


class GraderModelUnavailable(ServiceError):
    """A reinforcement job's model grader could not answer for a whole step (no replica serves its model, or
    every call failed): the job stops rather than train on rewards that are all 0. A job error, never an HTTP
    answer."""

    status, type, code = 503, "server_error", "grader_model_unavailable"


class InsufficientStorage(ServiceError):
    """The file or artifact store is out of space: nothing was saved, and retrying helps only once space is freed."""

    status, type, code = 507, "server_error", "insufficient_storage"


class InternalError(ServiceError):
    status, type, code = 500, "server_error", "internal_error"
