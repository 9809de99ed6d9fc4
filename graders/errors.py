"""The library's two failures: `GraderError`, a grader (or a run request) that cannot be accepted, with the
offending field's full path and a stable code; and `SampleError`, one sample that could not be graded, which
running turns into one of OpenAI's error flags and a reward of 0 (it never leaves `run_grader`)."""

from __future__ import annotations

from dataclasses import dataclass

# GraderError codes. Part of the public contract: never rename one.
INVALID_GRADER = "invalid_grader"
INVALID_TEMPLATE = "invalid_template"
INVALID_FORMULA = "invalid_formula"
GRADER_NOT_SUPPORTED = "grader_not_supported"
GRADER_TOO_LARGE = "grader_too_large"
# Run/validate request bodies, in the words of the service's error table (api/core/errors.py).
INVALID_PARAMETER = "invalid_parameter"
MISSING_PARAMETER = "missing_parameter"


class GraderError(ValueError):
    """A grader that cannot be accepted. `param` is the full path of the offending field
    (`grader.graders.exact.operation`), `code` one of the constants above; the API answers 400 with it."""

    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None, code: str = INVALID_GRADER):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        """The `error` object of OpenAI's error envelope."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def __repr__(self) -> str:
        return f"GraderError({self.message!r}, param={self.param!r}, code={self.code!r})"


# The boolean flags of OpenAI's `metadata.errors` (openai.types.fine_tuning.alpha.GraderRunResponse).
FORMULA_PARSE_ERROR = "formula_parse_error"
INVALID_VARIABLE_ERROR = "invalid_variable_error"
MODEL_GRADER_PARSE_ERROR = "model_grader_parse_error"
MODEL_GRADER_REFUSAL_ERROR = "model_grader_refusal_error"
MODEL_GRADER_SERVER_ERROR = "model_grader_server_error"
OTHER_ERROR = "other_error"
PYTHON_GRADER_RUNTIME_ERROR = "python_grader_runtime_error"
PYTHON_GRADER_SERVER_ERROR = "python_grader_server_error"
SAMPLE_PARSE_ERROR = "sample_parse_error"
TRUNCATED_OBSERVATION_ERROR = "truncated_observation_error"
UNRESPONSIVE_REWARD_ERROR = "unresponsive_reward_error"
ERROR_FLAGS = (
    FORMULA_PARSE_ERROR,
    INVALID_VARIABLE_ERROR,
    MODEL_GRADER_PARSE_ERROR,
    MODEL_GRADER_REFUSAL_ERROR,
    MODEL_GRADER_SERVER_ERROR,
    OTHER_ERROR,
    PYTHON_GRADER_RUNTIME_ERROR,
    PYTHON_GRADER_SERVER_ERROR,
    SAMPLE_PARSE_ERROR,
    TRUNCATED_OBSERVATION_ERROR,
    UNRESPONSIVE_REWARD_ERROR,
)


class SampleError(Exception):
    """One sample could not be graded: `flag` is one of ERROR_FLAGS, `message` says why."""

    def __init__(self, flag: str, message: str):
        if flag not in ERROR_FLAGS:
            raise ValueError(f"unknown error flag {flag!r}")
        super().__init__(message)
        self.flag = flag
        self.message = message


@dataclass(frozen=True)
class RunError:
    """A per-sample failure as a result records it: the flag, the message, and the path of the grader that
    failed (`grader`, `grader.graders.judge`)."""

    flag: str
    message: str
    grader: str

    def to_dict(self) -> dict:
        return {"flag": self.flag, "message": self.message, "grader": self.grader}
