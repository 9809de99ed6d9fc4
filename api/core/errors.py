"""The one error table. Services raise these; the API turns them into OpenAI's error envelope.

Each class fixes the HTTP status, the envelope `type` and a stable `code`; an instance adds the message
and the offending parameter. Codes are part of the public contract: never rename one.
"""

from __future__ import annotations


class ServiceError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, param: str | None = None, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
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
    """An unknown model where a request names one to build on (job creation): 400, per OpenAI."""

    code = "model_not_found"


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested completion do not fit the model's context window."""

    code = "context_length_exceeded"


class WrongModelTask(InvalidRequest):
    """A chat/completion request to a classifier, or a classification request to a language model."""

    code = "invalid_model"


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
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class ServiceUnavailable(ServiceError):
    status, type, code = 503, "server_error", "service_unavailable"


class InternalError(ServiceError):
    status, type, code = 500, "server_error", "internal_error"
