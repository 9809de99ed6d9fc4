"""OpenAI's graders as a plain library: check a grader object (string_check, text_similarity, score_model,
label_model, multi; python is refused) and score model samples with it. The API imports it to validate
graders at job creation and to serve `/v1/fine_tuning/alpha/graders/{validate,run}`; the worker to compute
rewards during reinforcement fine-tuning. It imports nothing of ours.

    compiled = compile_grader(grader)              # GraderError(message, param, code) if invalid
    result = compiled.run(sample, item, complete)  # never raises for a bad sample: reward 0 + error flag
    result.reward, result.ok, result.to_openai()

Modules, one job each: templating (`{{item.x}}`), formula (calculate_output), metrics (text similarity),
string_check / text_similarity / model_graders / multi (one grader family each), chat_calls (a model grader's
call as a chat completions request, and its answer), validation (checking and compiling a tree), context (the
state of grading one sample), running, result, endpoints (the two request bodies), fields (shared field
checks), limits (every size bound), errors."""

from graders.context import CompleteFn, ModelAnswer
from graders.endpoints import run_request, validate_request
from graders.errors import ERROR_FLAGS, GraderError, RunError
from graders.result import GraderResult
from graders.running import CompiledGrader, compile_grader, run_grader, run_graders_batch
from graders.validation import GRADER_TYPES, validate_grader

__all__ = [
    "ERROR_FLAGS",
    "GRADER_TYPES",
    "CompiledGrader",
    "CompleteFn",
    "GraderError",
    "GraderResult",
    "ModelAnswer",
    "RunError",
    "compile_grader",
    "run_grader",
    "run_graders_batch",
    "run_request",
    "validate_grader",
    "validate_request",
]
