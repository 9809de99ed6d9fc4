"""A reinforcement job's reward: its grader (OpenAI's grader object, checked at job creation) scoring each
sampled answer against the line it answers, through the graders library.

A sample the grader cannot score (a template naming a field the line lacks, say) scores 0, as OpenAI's
graders do; the count of such samples is kept so the job's events can say how many there were. Model graders
ask hosted models (worker/grader_models.py) on threads, so a replica batches a step's calls. A step in which
every answer failed for want of its grader model stops the job (GraderModelUnavailable): rewards of 0
throughout would train nothing and say nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from api.core.errors import GraderModelUnavailable
from api.core.settings import Settings
from api.core.storage import Storage
from graders import CompiledGrader, compile_grader
from graders.errors import MODEL_GRADER_SERVER_ERROR, UNRESPONSIVE_REWARD_ERROR
from worker.grader_models import GraderModels, job_grader_models

GRADER_PATH = "method.reinforcement.grader"
# Model calls in flight at once per job: enough for a replica to batch a step's answers.
GRADING_THREADS = 16
MODEL_UNAVAILABLE = (MODEL_GRADER_SERVER_ERROR, UNRESPONSIVE_REWARD_ERROR)


class GraderReward:
    """``svfit_core.training.reinforcement.Reward`` for one job's grader."""

    def __init__(self, grader: Mapping[str, Any] | CompiledGrader, models: GraderModels | None = None) -> None:
        self.compiled = grader if isinstance(grader, CompiledGrader) else compile_grader(grader, GRADER_PATH)
        self.models = models
        self.graded = 0
        self.failed = 0  # samples the grader could not score (reward 0)
        self.first_error: str | None = None  # what went wrong with the first of them
        self.model_tokens: Counter[str] = Counter()  # tokens each grader model read and wrote

    def __call__(self, items: list[dict], texts: list[str]) -> Sequence[float]:
        complete = self.models.complete if self.models is not None else None
        results = self.compiled.run_batch(zip(texts, items, strict=True), complete,
                                          max_workers=GRADING_THREADS if complete else 1)
        self.graded += len(results)
        for result in results:
            for model, usage in (result.token_usage_per_model or {}).items():
                self.model_tokens[model] += usage.get("total_tokens", 0)
            if not result.ok:
                self.failed += 1
                self.first_error = self.first_error or result.errors[0].message
        if complete is not None and results and all(_model_unavailable(r) for r in results):
            error = results[0].errors[0]
            raise GraderModelUnavailable(
                f"The grader could not score any of a step's {len(results)} answers: {error.message}",
                param=error.grader)
        return [r.reward for r in results]

    def summary(self) -> str | None:
        """A line for the job's events when some samples could not be graded, else None."""
        if not self.failed:
            return None
        return (f"{self.failed} of {self.graded} sampled answers could not be graded and scored 0; the first: "
                f"{self.first_error}")

    def usage(self) -> str | None:
        """A line for the job's events with the tokens the model graders used, else None."""
        if not self.model_tokens:
            return None
        spent = ", ".join(f"{model} {tokens:,}" for model, tokens in sorted(self.model_tokens.items()))
        total = sum(self.model_tokens.values())
        return f"Model graders used {total:,} tokens grading {self.graded:,} answers ({spent})."

    def close(self) -> None:
        if self.models is not None:
            self.models.close()


def _model_unavailable(result: Any) -> bool:
    return not result.ok and any(error.flag in MODEL_UNAVAILABLE for error in result.errors)


def job_reward(method: Mapping[str, Any] | None, *, org_id: str = "", settings: Settings | None = None,
               storage: Storage | None = None) -> GraderReward | None:
    """The reward of a job whose stored `method` is reinforcement, else None. A grader with model graders asks
    the organization's hosted models (`settings` and `storage` reach the replicas and the adapters)."""
    if not method or method.get("type") != "reinforcement":
        return None
    compiled = compile_grader(method["reinforcement"]["grader"], GRADER_PATH)
    fields = compiled.model_fields()
    if fields and (settings is None or storage is None):
        raise ValueError("a grader with model graders needs the settings and the store to reach its models")
    return GraderReward(compiled, job_grader_models(settings, storage, org_id, fields) if fields else None)
