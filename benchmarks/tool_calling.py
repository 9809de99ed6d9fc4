"""Tool calling: does a fine-tune on function-calling lines learn to call the right tool with valid arguments?

    python -m benchmarks.tool_calling [--quick] [--train-size N] [--eval-size N]

Model: SmolLM2-135M-Instruct (dequantised once, `quality_llm.prepare_base`). Data: SST-2 reviews routed to a
`label` tool (`LABEL_TOOL`: one argument, `sentiment`, "positive" or "negative"), in OpenAI's function-calling
fine-tuning format: the line's `tools`, the user's review and instruction (`INSTRUCTION`), and an assistant
turn that is only the call `label({"sentiment": <the review's label>})`. Each method's service default trains
a supervised job on ``--train-size`` lines (`service_defaults.service_job`: every hyperparameter "auto").

Evaluation: every model (the base, and each fine-tune merged into a model folder of its own) is served by the
service's own app and replica, and asked about ``--eval-size`` held-out reviews (the GLUE validation draw)
through the `openai` client with `tools=[LABEL_TOOL]` and `tool_choice` "auto" (greedy): the share of answers
with a valid call (the `label` tool, arguments a JSON object whose `sentiment` is one of the two), and the share
whose call is also right. The first ``--langchain`` reviews are asked again through LangChain's `bind_tools`
(`langchain-openai`), whose parser must read the same calls.

Targets (issue "Tools and structured outputs", measure): each fine-tune's valid-call share above the base's.
Results: benchmarks/results/tool_calling.json (tool_calling_quick.json for --quick).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import quality_llm
from benchmarks.common import REPO_ROOT, Stopwatch, format_table, log, write_result

LABEL_TOOL = {"type": "function", "function": {
    "name": "label", "description": "Record the sentiment of a movie review.",
    "parameters": {"type": "object", "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]}},
                   "required": ["sentiment"], "additionalProperties": False}}}
INSTRUCTION = "Record the sentiment of this movie review with the label tool."
MAX_SEQ_LENGTH = 384
METHODS = ("svfit", "lora")


def tool_line(review: str, label: str, index: int) -> dict:
    """One training line: the review, and the assistant's call of `label`."""
    return {"tools": [LABEL_TOOL], "messages": [
        {"role": "user", "content": f"{review}\n\n{INSTRUCTION}"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_{index}", "type": "function",
            "function": {"name": "label", "arguments": json.dumps({"sentiment": label})}}]}]}


def data(train_size: int, eval_size: int) -> dict[str, list]:
    chats = quality_llm.task_data("sst2", quality_llm.Settings(
        tasks=["sst2"], train_size=train_size, eval_size=eval_size, gsm8k_eval=0, gsm8k_em=0, seeds=1, jobs=1,
        threads_per_job=1))

    def pairs(rows):
        return [(c["messages"][0]["content"], c["messages"][-1]["content"]) for c in rows]

    return {"train": [tool_line(r, label, i) for i, (r, label) in enumerate(pairs(chats["train"]))],
            "heldout": pairs(chats["eval_em"])}


def grade(message) -> tuple[bool, str | None]:  # noqa: ANN001 - an openai ChatCompletionMessage
    """(a valid call of `label`, the sentiment it names)."""
    calls = message.tool_calls or []
    if len(calls) != 1 or calls[0].function.name != "label":
        return False, None
    try:
        arguments = json.loads(calls[0].function.arguments)
    except json.JSONDecodeError:
        return False, None
    sentiment = arguments.get("sentiment") if isinstance(arguments, dict) else None
    return sentiment in ("positive", "negative") and set(arguments) == {"sentiment"}, sentiment


def train(method: str, base: Path, lines: list[dict], workdir: Path) -> tuple[Path, dict]:
    """A supervised job as the service runs it; its fine-tune merged into a model folder of its own."""
    from benchmarks.service_defaults import service_job
    from svfit_core.training import TrainingCallbacks, run_training
    from svfit_core.training.outputs import write_artifact

    spec, config, hyperparameters = service_job({"type": method}, len(lines), 0, max_seq_length=MAX_SEQ_LENGTH)
    started: dict = {}

    class Recorder(TrainingCallbacks):
        def on_start(self, info: dict) -> None:
            started.update(info)

    with Stopwatch() as sw:
        result = run_training(base, lines, None, spec, config, workdir / f"job-{method}", callbacks=Recorder())
    merged = workdir / "models" / f"smollm2-tools-{method}"
    write_artifact(base, result.adapter_dir, "merged", merged)
    return merged, {"trainable_params": started.get("trainable_params"), "steps": result.step,
                    "truncated": started.get("truncated_examples"), "hyperparameters": hyperparameters,
                    "train_s": sw.seconds}


def evaluate(models_dir: Path, model_ids: list[str], heldout: list[tuple[str, str]], langchain: int,
             workdir: Path) -> dict[str, dict]:
    """Each model asked through the openai client (and the first ``langchain`` reviews through LangChain), served
    by the service's app and replica in this process."""
    from fastapi.testclient import TestClient
    from langchain_openai import ChatOpenAI
    from openai import OpenAI

    from api.core.settings import Settings
    from api.main import create_app
    from serving.embedded import ReplicaThread

    settings = Settings(data_dir=workdir / "data", models_dir=models_dir, require_auth=False,
                        inference_batch_window_ms=2.0, serving_token="benchmark-token")
    app = create_app(settings, dispatch=lambda job_id: None, auto_migrate=True)
    scores: dict[str, dict] = {}
    with ReplicaThread(settings), TestClient(app) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        for model in model_ids:
            valid = right = 0
            with Stopwatch() as sw:
                for review, label in heldout:
                    answer = client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": f"{review}\n\n{INSTRUCTION}"}],
                        tools=[LABEL_TOOL], temperature=0, max_tokens=40)
                    ok, sentiment = grade(answer.choices[0].message)
                    valid += ok
                    right += ok and sentiment == label
            llm = ChatOpenAI(base_url="http://testserver/v1", api_key="unused", model=model, temperature=0,
                             max_tokens=40, http_client=http).bind_tools([LABEL_TOOL])
            lc_valid = 0
            for review, _label in heldout[:langchain]:
                calls = llm.invoke(f"{review}\n\n{INSTRUCTION}").tool_calls
                lc_valid += len(calls) == 1 and calls[0]["name"] == "label" and \
                    calls[0]["args"].get("sentiment") in ("positive", "negative")
            scores[model] = {"valid_call_share": valid / len(heldout), "right_call_share": right / len(heldout),
                             "langchain_valid_call_share": lc_valid / max(1, min(langchain, len(heldout))),
                             "eval_s": sw.seconds}
            log(f"{model}: valid calls {valid}/{len(heldout)}, right {right}, LangChain {lc_valid}/{langchain}")
    app.state.engine.dispose()
    return scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 training lines, 32 held-out reviews")
    ap.add_argument("--train-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=100)
    ap.add_argument("--langchain", type=int, default=16, help="held-out reviews also asked through LangChain")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.train_size, args.eval_size, args.langchain = 32, 32, 8
    started = time.time()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="svfit-tools-"))
    try:
        base = quality_llm.prepare_base(workdir)
        sets = data(args.train_size, args.eval_size)
        models_dir = workdir / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
        served_base = models_dir / "smollm2"
        if not served_base.exists():
            served_base.symlink_to(base.resolve(), target_is_directory=True)
        trained = {}
        for method in METHODS:
            log(f"training {method} on {len(sets['train'])} function-calling lines")
            _merged, trained[method] = train(method, base, sets["train"], workdir)
        scores = evaluate(models_dir, ["smollm2", *(f"smollm2-tools-{m}" for m in METHODS)], sets["heldout"],
                          args.langchain, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    arms = [{"name": "base", **scores["smollm2"]}]
    arms += [{"name": m, **trained[m], **scores[f"smollm2-tools-{m}"]} for m in METHODS]
    targets = [{"name": f"{m}_valid_calls_over_base", "value": scores[f"smollm2-tools-{m}"]["valid_call_share"],
                "limit": scores["smollm2"]["valid_call_share"], "unit": "share of held-out answers (>)",
                "met": scores[f"smollm2-tools-{m}"]["valid_call_share"] > scores["smollm2"]["valid_call_share"]}
               for m in METHODS]
    print(format_table(["arm", "valid calls", "right calls", "LangChain valid", "trainable"],
                       [[a["name"], a["valid_call_share"], a["right_call_share"], a["langchain_valid_call_share"],
                         a.get("trainable_params")] for a in arms]))
    name = "tool_calling_quick" if args.quick else "tool_calling"
    path = write_result(name, {"settings": {k: v for k, v in vars(args).items() if k != "workdir"},
                               "tool": LABEL_TOOL, "instruction": INSTRUCTION, "arms": arms, "targets": targets},
                        started)
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
