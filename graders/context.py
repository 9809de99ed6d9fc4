"""The state of grading one sample: the namespaces its templates read, the model-completion callable the
caller injected, and what the graders report on the way (per-sample errors, token usage, each sub-grader's
reward). `GradingRun.grade` is the one place where a sub-grader's failure becomes a recorded error and a
reward of 0 instead of an exception."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Union

from graders.errors import (
    MODEL_GRADER_REFUSAL_ERROR,
    MODEL_GRADER_SERVER_ERROR,
    OTHER_ERROR,
    UNRESPONSIVE_REWARD_ERROR,
    RunError,
    SampleError,
)

if TYPE_CHECKING:
    from graders.templating import Namespaces

USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")
_MAX_DETAIL_CHARS = 500


@dataclass(frozen=True)
class ModelAnswer:
    """What a `complete` callable may return instead of a bare string: the text, the token usage if known
    (`prompt_tokens`, `completion_tokens`, `total_tokens`, `cached_tokens`), and the refusal text if the
    model refused (which becomes model_grader_refusal_error)."""

    text: str
    usage: Mapping[str, int] | None = None
    refusal: str | None = None


# complete(model, messages, sampling_params) -> str | ModelAnswer. `messages` are chat messages
# ({"role": "system" | "user" | "assistant", "content": str}); `sampling_params` holds only the keys the grader
# set, under OpenAI's names (max_completions_tokens, temperature, top_p, seed, reasoning_effort).
# Raising TimeoutError marks the sample unresponsive_reward_error; any other exception model_grader_server_error.
CompleteFn = Callable[[str, list[dict], dict], Union[str, ModelAnswer]]


class GraderNode(Protocol):
    """A compiled grader of any family."""

    type: str
    name: str

    def grade(self, run: GradingRun, path: str, key: str) -> float: ...


@dataclass
class GradingRun:
    namespaces: Namespaces
    complete_fn: CompleteFn | None = None
    errors: list[RunError] = field(default_factory=list)
    # Every sub-grader's reward by its dotted key below the root ("judge", "inner.exact").
    scores: dict[str, float] = field(default_factory=dict)
    usage_per_model: dict[str, dict[str, int]] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)

    def grade(self, node: GraderNode, path: str, key: str = "") -> float:
        """`node`'s reward for this sample; a failure is recorded (with `path`) and scores 0."""
        try:
            reward = float(node.grade(self, path, key))
        except SampleError as exc:
            self.errors.append(RunError(exc.flag, exc.message, path))
            reward = 0.0
        except Exception as exc:  # a bug or a library error must not end a training job: one sample scores 0
            self.errors.append(RunError(OTHER_ERROR, f"{type(exc).__name__}: {exc}"[:_MAX_DETAIL_CHARS], path))
            reward = 0.0
        if key:
            self.scores[key] = reward
        return reward

    def complete(self, model: str, messages: list[dict], sampling_params: Mapping[str, Any]) -> ModelAnswer:
        """Ask `model` through the injected callable; every way that can fail is a SampleError."""
        if self.complete_fn is None:
            raise SampleError(MODEL_GRADER_SERVER_ERROR, "No model can be called here, so model graders cannot run.")
        if model not in self.models:
            self.models.append(model)
        try:
            answer = self.complete_fn(model, messages, dict(sampling_params))
        except TimeoutError as exc:
            raise _error(UNRESPONSIVE_REWARD_ERROR, f"The grader model {model} did not answer in time: {exc}") from None
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            raise _error(MODEL_GRADER_SERVER_ERROR, f"The grader model {model} failed: {failure}") from None
        if isinstance(answer, str):
            answer = ModelAnswer(answer)
        if not isinstance(answer, ModelAnswer) or not isinstance(answer.text, str):
            returned = type(answer).__name__
            raise _error(MODEL_GRADER_SERVER_ERROR, f"The grader model {model} returned {returned}, not text.")
        self._count_usage(model, answer.usage)
        if answer.refusal:
            raise _error(MODEL_GRADER_REFUSAL_ERROR, f"The grader model {model} refused: {answer.refusal}")
        return answer

    def _count_usage(self, model: str, usage: Mapping[str, Any] | None) -> None:
        if not usage:
            return
        counts = {k: usage[k] for k in USAGE_FIELDS if type(usage.get(k)) is int}
        if "total_tokens" not in counts and ("prompt_tokens" in counts or "completion_tokens" in counts):
            counts["total_tokens"] = counts.get("prompt_tokens", 0) + counts.get("completion_tokens", 0)
        totals = self.usage_per_model.setdefault(model, {})
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v


def _error(flag: str, message: str) -> SampleError:
    return SampleError(flag, message[:_MAX_DETAIL_CHARS])
