"""Running a grader over samples: `compile_grader` checks a grader once, `CompiledGrader.run` grades one
(sample, item) pair, `run_graders_batch` a list of them (threads help when a model grader waits on a
model). A sample that cannot be graded gives reward 0 and its error flag: nothing a sample does makes these
functions raise. Only an invalid grader raises, GraderError, and only from compiling."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from graders.context import CompleteFn, GraderNode, GradingRun
from graders.errors import SAMPLE_PARSE_ERROR, RunError
from graders.model_graders import MODEL_GRADER_TYPES
from graders.result import GraderResult
from graders.templating import Namespaces
from graders.validation import compile_node


class CompiledGrader:
    """A checked grader, ready to grade many samples (compile once per training job, not per sample)."""

    def __init__(self, grader: Mapping, node: GraderNode, path: str = "grader"):
        self.grader = grader
        self.node = node
        self.path = path

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def type(self) -> str:
        return self.node.type

    def model_fields(self) -> dict[str, str]:
        """The model each model grader of the tree names, by the full path of its `model` field
        (`grader.model`, `grader.graders.judge.model`)."""
        found: dict[str, str] = {}

        def visit(node: Any, path: str) -> None:
            if node.type == "multi":
                for key, sub in node.graders:
                    visit(sub, f"{path}.graders.{key}")
            elif node.type in MODEL_GRADER_TYPES:
                found[f"{path}.model"] = node.model

        visit(self.node, self.path)
        return found

    def run(self, sample: str, item: Any = None, complete: CompleteFn | None = None) -> GraderResult:
        """Grade `sample` (the model's answer) for dataset row `item`."""
        started = time.perf_counter()
        if isinstance(sample, str):
            run = GradingRun(Namespaces(sample, item), complete)
            reward = run.grade(self.node, self.path)
        else:
            run = GradingRun(Namespaces("", item), complete)
            message = f"The sample must be a string, not {type(sample).__name__}."
            run.errors.append(RunError(SAMPLE_PARSE_ERROR, message, self.path))
            reward = 0.0
        usage = run.usage_per_model
        total = sum(u.get("total_tokens", 0) for u in usage.values()) if usage else None
        return GraderResult(
            reward=0.0 if run.errors else reward,
            name=self.name,
            type=self.type,
            # The top multi grader's direct sub-graders: the keys without a dot.
            sub_rewards={k: v for k, v in run.scores.items() if "." not in k} if self.type == "multi" else {},
            scores=dict(run.scores),
            errors=tuple(run.errors),
            execution_time=time.perf_counter() - started,
            token_usage=total,
            token_usage_per_model=usage,
            sampled_model_name=run.models[0] if len(run.models) == 1 else None,
        )

    def run_batch(
        self, samples: Iterable[tuple[str, Any]], complete: CompleteFn | None = None, *, max_workers: int = 1
    ) -> list[GraderResult]:
        """Grade each (sample, item) pair, results in the same order. `max_workers` > 1 grades pairs on
        threads: worth it when `complete` waits on a model server, not for the text graders."""
        pairs = list(samples)
        if max_workers <= 1 or len(pairs) <= 1:
            return [self.run(sample, item, complete) for sample, item in pairs]
        with ThreadPoolExecutor(max_workers=min(max_workers, len(pairs))) as pool:
            return list(pool.map(lambda pair: self.run(pair[0], pair[1], complete), pairs))


def compile_grader(grader: Any, path: str = "grader") -> CompiledGrader:
    """Check `grader`, raising GraderError naming the bad field, and return it ready to run."""
    return CompiledGrader(grader, compile_node(grader, path), path)


def run_grader(
    grader: Mapping | CompiledGrader, sample: str, item: Any = None, complete: CompleteFn | None = None
) -> GraderResult:
    """Grade one sample. `grader` is a grader object (checked first: GraderError if invalid) or a
    CompiledGrader; `item` fills the `item` namespace; `complete` answers the model graders."""
    compiled = grader if isinstance(grader, CompiledGrader) else compile_grader(grader)
    return compiled.run(sample, item, complete)


def run_graders_batch(
    grader: Mapping | CompiledGrader,
    samples: Iterable[tuple[str, Any]],
    complete: CompleteFn | None = None,
    *,
    max_workers: int = 1,
) -> list[GraderResult]:
    """Grade each (sample, item) pair with one grader, checked once; see CompiledGrader.run_batch."""
    compiled = grader if isinstance(grader, CompiledGrader) else compile_grader(grader)
    return compiled.run_batch(samples, complete, max_workers=max_workers)
