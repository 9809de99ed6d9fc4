"""The text_similarity grader: `{type, name, input, reference, evaluation_metric, pass_threshold?}` scores
the rendered input against the rendered reference with one metric of graders.metrics, a number in [0, 1].
`pass_threshold` (OpenAI's evals field) is checked and kept but does not change the reward: fine-tuning
rewards the similarity itself."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from graders.errors import GRADER_NOT_SUPPORTED, GraderError
from graders.fields import check_enum, check_keys, check_name, check_number, child
from graders.metrics import METRICS, UNSUPPORTED_METRICS
from graders.templating import Template, compile_template

if TYPE_CHECKING:
    from graders.context import GradingRun

# OpenAI's list, in its order.
EVALUATION_METRICS = (
    "cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l",
)


@dataclass(frozen=True)
class TextSimilarity:
    type: ClassVar[str] = "text_similarity"
    name: str
    input: Template
    reference: Template
    evaluation_metric: str
    pass_threshold: float | None = None

    def grade(self, run: GradingRun, path: str, key: str) -> float:
        text = self.input.render(run.namespaces)
        reference = self.reference.render(run.namespaces)
        return METRICS[self.evaluation_metric](text, reference)


def compile_text_similarity(grader: Mapping, path: str) -> TextSimilarity:
    check_keys(grader, path, ("type", "name", "input", "reference", "evaluation_metric"), ("pass_threshold",))
    metric_path = child(path, "evaluation_metric")
    metric = check_enum(grader["evaluation_metric"], metric_path, EVALUATION_METRICS)
    if metric in UNSUPPORTED_METRICS:
        raise GraderError(
            f"evaluation_metric '{metric}' is not supported: {UNSUPPORTED_METRICS[metric]}. "
            f"Use one of {', '.join(METRICS)}.", metric_path, GRADER_NOT_SUPPORTED,
        )
    threshold = grader.get("pass_threshold")
    if threshold is not None:
        threshold = check_number(threshold, child(path, "pass_threshold"), low=0, high=1)
    return TextSimilarity(
        name=check_name(grader, path),
        input=compile_template(grader["input"], child(path, "input")),
        reference=compile_template(grader["reference"], child(path, "reference")),
        evaluation_metric=metric,
        pass_threshold=threshold,
    )
