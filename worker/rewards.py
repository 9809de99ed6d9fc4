"""A reinforcement job's reward: its grader (OpenAI's grader object, checked at job creation) scoring each
sampled answer against the line it answers, through the graders library.

A sample the grader cannot score (a template naming a field the line lacks, say) scores 0, as OpenAI's
graders do; the count of such samples is kept so the job's events can say how many there were.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from graders import compile_grader


class GraderReward:
    """``svfit_core.training.reinforcement.Reward`` for one job's grader."""

    def __init__(self, grader: Mapping[str, Any]) -> None:
        self.compiled = compile_grader(grader, "method.reinforcement.grader")
        self.graded = 0
        self.failed = 0  # samples the grader could not score (reward 0)
        self.first_error: str | None = None  # what went wrong with the first of them

    def __call__(self, items: list[dict], texts: list[str]) -> Sequence[float]:
        results = self.compiled.run_batch(zip(texts, items, strict=True))
        self.graded += len(results)
        for result in results:
            if not result.ok:
                self.failed += 1
                self.first_error = self.first_error or result.errors[0].message
        return [r.reward for r in results]

    def summary(self) -> str | None:
        """A line for the job's events when some samples could not be graded, else None."""
        if not self.failed:
            return None
        return (f"{self.failed} of {self.graded} sampled answers could not be graded and scored 0; the first: "
                f"{self.first_error}")


def job_reward(method: Mapping[str, Any] | None) -> GraderReward | None:
    """The reward of a job whose stored `method` is reinforcement, else None."""
    if not method or method.get("type") != "reinforcement":
        return None
    return GraderReward(method["reinforcement"]["grader"])
