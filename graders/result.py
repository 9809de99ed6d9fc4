"""What grading one sample gives: `GraderResult`, with the reward, each sub-grader's reward, the per-sample
errors, timing and token usage, and `to_openai()`, the body of OpenAI's `/fine_tuning/alpha/graders/run`
response (openai.types.fine_tuning.alpha.GraderRunResponse)."""

from __future__ import annotations

from dataclasses import dataclass, field

from graders.errors import (
    ERROR_FLAGS,
    MODEL_GRADER_SERVER_ERROR,
    RunError,
)


@dataclass(frozen=True)
class GraderResult:
    reward: float  # 0.0 whenever `errors` is not empty
    name: str
    type: str
    # The top multi grader's sub-graders by key (empty for other graders), as OpenAI's `sub_rewards`.
    sub_rewards: dict[str, float] = field(default_factory=dict)
    # Every sub-grader's reward at any depth, by dotted key ("judge", "inner.exact"): OpenAI's `metadata.scores`.
    scores: dict[str, float] = field(default_factory=dict)
    errors: tuple[RunError, ...] = ()
    execution_time: float = 0.0  # seconds
    token_usage: int | None = None  # total tokens of the grader models, None when they reported none
    token_usage_per_model: dict[str, dict[str, int]] = field(default_factory=dict)
    sampled_model_name: str | None = None  # the grader model, when exactly one was called

    @property
    def ok(self) -> bool:
        """Graded without a failure. A trainer may drop a sample that is not ok rather than reward it 0."""
        return not self.errors

    @property
    def error_flags(self) -> dict:
        """OpenAI's `metadata.errors` object: every flag, and the detail strings."""
        flags: dict = {flag: any(e.flag == flag for e in self.errors) for flag in ERROR_FLAGS}
        server = [e.message for e in self.errors if e.flag == MODEL_GRADER_SERVER_ERROR]
        flags["model_grader_server_error_details"] = "; ".join(server) if server else None
        flags["python_grader_runtime_error_details"] = None
        flags["python_grader_server_error_type"] = None
        return flags

    def to_openai(self) -> dict:
        """The `/fine_tuning/alpha/graders/run` response body. `metadata.error_details` is our extension:
        each failure's flag, message and grader path (the flags alone do not say which sub-grader failed)."""
        return {
            "reward": self.reward,
            "metadata": {
                "name": self.name,
                "type": self.type,
                "errors": self.error_flags,
                "execution_time": self.execution_time,
                "scores": dict(self.scores),
                "token_usage": self.token_usage,
                "sampled_model_name": self.sampled_model_name,
                "error_details": [e.to_dict() for e in self.errors],
            },
            "sub_rewards": dict(self.sub_rewards),
            "model_grader_token_usage_per_model": {
                model: dict(usage) for model, usage in self.token_usage_per_model.items()
            },
        }
