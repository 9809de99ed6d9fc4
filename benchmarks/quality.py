"""Quality: does SVFit match LoRA r=8 (and come within a point of full fine-tuning) while training ≥ 16×
fewer parameters? Pretrained MiniLM-L6 on SST-2 and TREC-6, every arm trained by the same loop.

    python -m benchmarks.quality [--quick]

Arms (the classification head trains in every arm, and the pooler under it in every arm but head_only):
    head_only        a linear probe: only the head trains
    full             full fine-tuning
    lora_r8_qv       LoRA r=8, alpha 16, on query/value (HF PEFT)
    pissa_r8_qv      PiSSA r=8 on query/value (HF PEFT, init_lora_weights="pissa")
    svfit_rk_qv      SVFit with r = k (every singular value) on query/value
    svfit_e099_all   SVFit with τ = 0.99 (squared energy) on every linear layer of the encoder blocks
    svfit_r128_all   SVFit with r = 128 on every linear layer: svfit_rk_qv's 4,608 parameters, spread out
    svfit_rk_ffn     SVFit with r = k on the feed-forward pair
    svfit_band1_qv   svfit_rk_qv with one trained off-diagonal each side of the coupling (SVFT's banded variant)
    svfit_default, lora_default, full_default
                     each method exactly as the service trains it when a request names only `peft.type`:
                     targets, rank, learning rates, epochs and batch size all "auto" (no sweep)
    svfit_r256_all_auto, lora_r16_all_auto
                     candidate defaults: a request naming targets and rank, everything else "auto"

Protocol (the same for every arm):
- Data: a fixed random training subset and a disjoint held-out slice, both drawn from the task's training
  split. Accuracy is reported on the task's own evaluation split (SST-2: the 872-example GLUE validation
  set; TREC: the 500-question test set), which no selection ever looks at.
- Learning rate: each arm has a grid of three values around its usual recipe, widened by one step where
  the first full run chose an edge value (head-only, PiSSA). On the sweep task (SST-2)
  seed 0 trains once per value and the value with the best held-out accuracy is kept; the other task
  uses the value chosen there. A sweep run at the chosen value doubles as that task's seed 0 (its
  selection never saw the evaluation split).
- Everything else is shared: epochs, batch size, max_seq_length 64, AdamW, 10% warm-up then linear decay,
  gradient clipping at 1.0, no weight decay, and one head learning rate for every arm that has a body to
  train (HEAD_LR; the head-only arm sweeps it instead).
- Training is `svfit_core.training.run_training`; the reported accuracy comes from loading the final
  adapter it wrote (`svfit_core.training.outputs.load_trained_model`) and classifying the evaluation split, so
  the save/load path is what gets measured.
- Runs are independent, so they run in parallel worker processes (--jobs, default 2) with one torch
  thread each: on small CPU matrices that uses two cores better than two threads on one run, and it
  degrades gracefully when other work shares the machine. `wall_s` is therefore single-thread time.

Results go to benchmarks/results/quality.json (quality_quick.json for --quick). Completed runs are logged
to benchmarks/results/<name>.runs.tmp, so an interrupted run continues with --resume.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    DATA_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    Stopwatch,
    format_table,
    mean_std,
    minilm_path,
    write_result,
)
from benchmarks.runs import RunLog, run_in_workers
from benchmarks.service_defaults import service_job

HEAD_LR = 5e-3  # SVFT's recipe uses 6e-3 on the head; one value, shared by every arm that trains a body
DATA_SEED = 1234  # fixes which examples form the training subset and the held-out slice
QV = ["query", "value"]


@dataclass
class ArmSpec:
    name: str
    peft: dict[str, Any]  # PeftSpec fields
    lr_grid: tuple[float, ...]
    note: str = ""
    # The request's `peft` for an arm that runs as the service runs it: every hyperparameter "auto"
    # (benchmarks/service_defaults.py), no sweep, the service's own learning rates for body and head.
    service: dict[str, Any] | None = None
    service_hyperparameters: dict[str, Any] | None = None  # the request's `hyperparameters` (None: all auto)


ARMS = [
    # A probe keeps MiniLM's pooler frozen (every other arm trains it with the head), and the frozen pooler
    # gives nearly constant outputs, so a probe on it needs a high rate; the grid sits higher for that reason.
    ArmSpec("head_only", {"method": "head_only"}, (3e-3, 1e-2, 3e-2, 1e-1), "linear probe; sweeps the head lr"),
    ArmSpec("full", {"method": "full"}, (2e-5, 5e-5, 1e-4), "every weight trains"),
    ArmSpec("lora_r8_qv", {"method": "lora", "rank": 8, "lora_alpha": 16, "target_modules": QV},
            (3e-4, 1e-3, 3e-3), "HF PEFT LoRA, alpha 16, no dropout"),
    ArmSpec("pissa_r8_qv", {"method": "pissa", "rank": 8, "lora_alpha": 16, "target_modules": QV},
            (1e-4, 3e-4, 1e-3, 3e-3), "HF PEFT PiSSA initialisation"),
    ArmSpec("svfit_rk_qv", {"method": "svfit", "target_modules": QV}, (1e-2, 3e-2, 1e-1),
            "r = k: every singular value of W_q, W_v"),
    ArmSpec("svfit_e099_all", {"method": "svfit", "energy": 0.99, "target_modules": "all-linear"},
            (1e-2, 3e-2, 1e-1), "r per matrix holds 99% of sum s^2"),
    # The parameter budget of svfit_rk_qv (4,608: 16x fewer than LoRA r=8) spread over all 36 linear layers.
    ArmSpec("svfit_r128_all", {"method": "svfit", "rank": 128, "target_modules": "all-linear"},
            (1e-2, 3e-2, 1e-1), "top 128 singular values of every encoder linear layer"),
    # SVFT's banded variant: Δσ plus one trained off-diagonal on each side of the r x r coupling.
    ArmSpec("svfit_band1_qv", {"method": "svfit", "target_modules": QV, "band": 1}, (1e-2, 3e-2, 1e-1),
            "r = k on query/value, banded coupling d = 1"),
    # The same budget again, on the feed-forward pair (intermediate and output dense) instead of query/value.
    ArmSpec("svfit_rk_ffn", {"method": "svfit", "target_modules": r".*layer\.\d+\.(intermediate|output)\.dense"},
            (1e-2, 3e-2, 1e-1), "r = k: every singular value of the feed-forward matrices"),
]
# Each method exactly as the service trains it when a request names only `peft.type`.
SERVICE_ARMS = [ArmSpec(f"{kind}_default", {"method": kind}, (), "the service's defaults, every value auto",
                        service={"type": kind}) for kind in ("svfit", "lora", "full")]
# Candidate defaults: a request naming targets and rank, every hyperparameter still the service's "auto".
SERVICE_ARMS += [
    ArmSpec("svfit_r256_all_auto", {"method": "svfit"}, (), "top 256 singular values of every block linear",
            service={"type": "svfit", "rank": 256, "target_modules": "all-linear"}),
    ArmSpec("lora_r16_all_auto", {"method": "lora"}, (), "LoRA r=16 on every block linear",
            service={"type": "lora", "rank": 16, "target_modules": "all-linear"}),
    ArmSpec("svfit_r256_all_x2", {"method": "svfit"}, (), "svfit_r256_all_auto at twice the learning rate",
            service={"type": "svfit", "rank": 256, "target_modules": "all-linear"},
            service_hyperparameters={"learning_rate_multiplier": 2}),
    ArmSpec("lora_r16_all_x4", {"method": "lora"}, (), "lora_r16_all_auto at four times the learning rate",
            service={"type": "lora", "rank": 16, "target_modules": "all-linear"},
            service_hyperparameters={"learning_rate_multiplier": 4}),
    # Twice the optimizer steps at the same compute: the default in batches of 4 instead of the auto rule's 8.
    ArmSpec("svfit_b4_auto", {"method": "svfit"}, (), "the service's SVFit default in batches of 4",
            service={"type": "svfit"}, service_hyperparameters={"batch_size": 4}),
    # The head and the pretrained pooler at LoRA's head rate (5e-4) instead of SVFit's (5e-3).
    ArmSpec("svfit_r256_all_head5e-4", {"method": "svfit"}, (), "svfit_r256_all_auto, head and pooler at 5e-4",
            service={"type": "svfit", "rank": 256, "target_modules": "all-linear", "head_learning_rate": 5e-4}),
]
ARMS += SERVICE_ARMS
ARMS_BY_NAME = {a.name: a for a in ARMS}


@dataclass
class Settings:
    tasks: list[str]
    sweep_task: str | None  # None: no sweep, each arm's middle grid value
    train_size: int
    heldout_size: int
    n_epochs: int
    batch_size: int
    max_seq_length: int
    seeds: int
    jobs: int
    threads_per_job: int
    device: str = "cpu"


FULL = Settings(tasks=["sst2", "trec"], sweep_task="sst2", train_size=2000, heldout_size=500, n_epochs=3,
                batch_size=16, max_seq_length=64, seeds=3, jobs=2, threads_per_job=1)
# The smoke version: one task, one short epoch, no sweep, two seeds.
QUICK = Settings(tasks=["sst2"], sweep_task=None, train_size=640, heldout_size=200, n_epochs=1,
                 batch_size=16, max_seq_length=64, seeds=2, jobs=2, threads_per_job=1)
EVAL_SPLIT = {"sst2": "validation", "trec": "test", "cola": "validation", "mrpc": "validation"}


# ---------------------------------------------------------------------------------------------- data


def load_split(name: str, split: str) -> list[dict]:
    manifest = json.loads((DATA_DIR / "manifest.json").read_text())
    files = manifest["datasets"][name]["splits"][split]["files"]
    return [json.loads(line) for f in files for line in (DATA_DIR / f).open(encoding="utf-8")]


@functools.lru_cache(maxsize=4)
def task_data(name: str, train_size: int, heldout_size: int) -> dict[str, Any]:
    """The training subset, the held-out slice (disjoint draws from the training split, the same for every
    arm and seed), the evaluation split and the label names."""
    manifest = json.loads((DATA_DIR / "manifest.json").read_text())
    pool = load_split(name, "train")
    order = np.random.default_rng(DATA_SEED).permutation(len(pool))
    n_train = min(train_size, len(pool) - heldout_size)
    return {
        "train": [pool[i] for i in order[:n_train]],
        "heldout": [pool[i] for i in order[n_train:n_train + heldout_size]],
        "evaluation": load_split(name, EVAL_SPLIT[name]),
        "eval_split": EVAL_SPLIT[name],
        "label_names": manifest["datasets"][name]["label_names"],
    }


# ------------------------------------------------------------------------------ one run (in a worker)


def evaluate(base_path: str, adapter_dir: Path, examples: list[dict], max_len: int, device: str = "cpu",
             batch: int = 64) -> float:
    """Accuracy of the adapter ``run_training`` wrote, loaded the way the service loads it."""
    import torch

    from svfit_core.training.outputs import load_trained_model
    from svfit_core.training.collate import collate
    from svfit_core.training.encoding import encode_example

    model, tokenizer, _ = load_trained_model(base_path, adapter_dir)
    model.to(device)
    token_types = bool(getattr(model.config, "type_vocab_size", 0))
    rows = [encode_example(ex, "classification", tokenizer, max_len, token_types=token_types) for ex in examples]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths pad less
    correct = 0
    with torch.no_grad():
        for start in range(0, len(order), batch):
            chunk = [rows[i] for i in order[start:start + batch]]
            inputs = {k: t.to(device) for k, t in collate(chunk, tokenizer.pad_token_id).items()}
            labels = inputs.pop("labels")
            correct += int((model(**inputs).logits.argmax(-1) == labels).sum())
    return correct / len(rows)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (task, arm, lr, seed) with run_training, then evaluate what it wrote. Never raises: a
    failed run comes back as a record with status "error"."""
    from svfit_core.training import PeftSpec, TrainConfig, TrainingCallbacks, run_training

    settings = Settings(**job["settings"])
    arm = ARMS_BY_NAME[job["arm"]]
    data = task_data(job["task"], settings.train_size, settings.heldout_size)
    lr, seed = job["lr"], job["seed"]
    head_lr = lr if arm.peft["method"] == "head_only" else HEAD_LR
    record: dict[str, Any] = {"task": job["task"], "arm": arm.name, "lr": lr, "head_lr": head_lr, "seed": seed}
    started: dict[str, Any] = {}

    class Recorder(TrainingCallbacks):
        def on_start(self, info: dict) -> None:
            started.update(info)

    config = TrainConfig(n_epochs=settings.n_epochs, batch_size=settings.batch_size, learning_rate=lr,
                         head_learning_rate=head_lr, weight_decay=0.0, warmup_ratio=0.1, lr_scheduler="linear",
                         max_grad_norm=1.0, max_seq_length=settings.max_seq_length, seed=seed,
                         label_names=data["label_names"], device=settings.device)
    peft = PeftSpec(**arm.peft)
    if arm.service is not None:
        peft, config, _ = service_job(arm.service, len(data["train"]), seed, arm.service_hyperparameters,
                                      max_seq_length=settings.max_seq_length,
                                      label_names=data["label_names"], device=settings.device)
        record["epochs"], record["batch_size"] = config.n_epochs, config.batch_size
        record["head_lr"] = config.resolved(peft.method).head_learning_rate
    base = minilm_path()
    out = Path(tempfile.mkdtemp(prefix=f"svfit-quality-{arm.name}-"))
    try:
        with Stopwatch() as train_sw:
            result = run_training(base, data["train"], data["heldout"], peft, config, out,
                                  callbacks=Recorder())
        with Stopwatch() as eval_sw:
            accuracy = evaluate(base, result.adapter_dir, data["evaluation"], settings.max_seq_length,
                                settings.device)
        record.update(
            status="ok" if result.ended_by == "completion" else result.ended_by, steps=result.step, trained_tokens=result.trained_tokens,
            trainable_params=started.get("trainable_params"),
            heldout_accuracy=result.metrics.get("valid_mean_token_accuracy"),
            final_train_loss=result.metrics.get("train_loss"),
            accuracy=accuracy, wall_s=train_sw.seconds, eval_wall_s=eval_sw.seconds,
        )
    except Exception as exc:  # noqa: BLE001 - one failed run is recorded, the benchmark goes on
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return record


# --------------------------------------------------------------------------------------------- driver


def run_key(rec: dict) -> tuple:
    return rec["task"], rec["arm"], float(rec["lr"]), int(rec["seed"])


def describe(rec: dict) -> str:
    return (f"{rec['task']} {rec['arm']} lr={rec['lr']:g} seed={rec['seed']}: held-out {rec['heldout_accuracy']:.4f}, "
            f"eval {rec['accuracy']:.4f}, {rec['wall_s']:.0f} s")


def run_jobs(jobs: list[dict], settings: Settings, runlog: RunLog) -> list[dict | None]:
    """Run the jobs not already logged, ``settings.jobs`` at a time; records in the order of ``jobs``."""
    return run_in_workers(jobs, runlog, run_one, settings.jobs, settings.threads_per_job, describe)


@functools.lru_cache(maxsize=1)
def pooler_param_count() -> int:
    """Parameters of MiniLM's pooler (a dense hidden x hidden layer), trained in full with the head."""
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(minilm_path()).hidden_size
    return hidden * hidden + hidden


def head_param_count(num_labels: int) -> int:
    """Parameters of MiniLM's classification head (a fresh Linear(hidden, labels))."""
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(minilm_path()).hidden_size
    return hidden * num_labels + num_labels


def select_lrs(settings: Settings, arms: list[ArmSpec], runlog: RunLog) -> tuple[dict[str, float], list[dict]]:
    """Each arm's learning rate: the best held-out accuracy on the sweep task (seed 0), or without a sweep
    the middle of its grid. Returns the choice and the sweep records."""
    service = {a.name: service_learning_rate(a, settings) for a in arms if a.service is not None}
    arms = [a for a in arms if a.service is None]
    if settings.sweep_task is None:
        return {**{a.name: a.lr_grid[len(a.lr_grid) // 2] for a in arms}, **service}, []
    sdict = asdict(settings)
    jobs = [{"task": settings.sweep_task, "arm": a.name, "lr": lr, "seed": 0, "settings": sdict}
            for a in arms for lr in a.lr_grid]
    records = run_jobs(jobs, settings, runlog)
    chosen = {}
    for arm in arms:
        ok = [r for r in records if r and r["arm"] == arm.name and r["status"] == "ok"]
        if ok:
            # Highest held-out accuracy; a tie goes to the smaller learning rate.
            chosen[arm.name] = max(ok, key=lambda r: (r["heldout_accuracy"], -r["lr"]))["lr"]
    chosen.update(service)
    sweep = [{k: r.get(k) for k in ("task", "arm", "lr", "seed", "heldout_accuracy", "accuracy", "wall_s",
                                    "status", "error")} for r in records if r]
    return chosen, sweep


def service_learning_rate(arm: ArmSpec, settings: Settings) -> float:
    """The learning rate the service picks for this arm on a training file of ``settings.train_size`` lines."""
    return service_job(arm.service, settings.train_size, 0, arm.service_hyperparameters)[1].learning_rate


def summarise(task: str, arm: ArmSpec, lr: float, records: list[dict], settings: Settings,
              head_params: int) -> dict[str, Any]:
    from svfit_core.training.methods import get_method

    ok = [r for r in records if r and r["status"] == "ok"]
    if not ok:
        errors = [r.get("error") for r in records if r]
        return {"task": task, "name": arm.name, "method": arm.peft["method"], "status": "error",
                "error": errors[0] if errors else "not run", "trainable_params": None}
    accs = [r["accuracy"] for r in ok]
    mean, std = mean_std(accs)
    trainable = ok[0]["trainable_params"]
    return {
        "task": task,
        "name": arm.name,
        "method": arm.peft["method"],
        "peft": arm.peft,
        "note": arm.note,
        "learning_rate": lr,
        "head_learning_rate": ok[0]["head_lr"],
        "lr_grid": list(arm.lr_grid) if settings.sweep_task else [lr],
        "trainable_params": trainable,
        # The pooler trains with the head (in full) in every arm but the probe and full fine-tuning, where it
        # stays frozen or is part of the body: it is no more the method's parameters than the head is.
        "trainable_params_excl_head": trainable - head_params - (
            pooler_param_count() if get_method(arm.peft["method"]).head_includes_pooler else 0),
        "head_params": head_params,
        "accuracy_mean": mean,
        "accuracy_std": std,
        "seeds": len(accs),
        "accuracies": accs,
        "heldout_accuracies": [r["heldout_accuracy"] for r in ok],
        "wall_s": mean_std([r["wall_s"] for r in ok])[0],
        "steps": ok[0]["steps"],
    }


def add_comparisons(rows: list[dict]) -> None:
    """Ratios and differences against the baselines measured in the same run, per task."""
    for task in {r["task"] for r in rows}:
        by = {r["name"]: r for r in rows if r["task"] == task and "accuracy_mean" in r}
        lora, full = by.get("lora_r8_qv"), by.get("full")
        for r in by.values():
            excl = r["trainable_params_excl_head"]
            if lora:
                r["accuracy_minus_lora_r8"] = r["accuracy_mean"] - lora["accuracy_mean"]
                r["params_fewer_than_lora_r8"] = (lora["trainable_params_excl_head"] / excl) if excl else None
            if full:
                r["accuracy_minus_full"] = r["accuracy_mean"] - full["accuracy_mean"]


def check_targets(rows: list[dict]) -> list[dict]:
    """SVFIT.md's quality claim, per SVFit arm: ≥ LoRA r=8 accuracy at ≥ 16× fewer trainable parameters
    (head excluded), and within 1 point of full fine-tuning."""
    out = []
    for r in rows:
        if r.get("method") != "svfit" or "accuracy_minus_lora_r8" not in r:
            continue
        fewer = r.get("params_fewer_than_lora_r8") or 0.0
        vs_full = r.get("accuracy_minus_full")
        out.append({"task": r["task"], "arm": r["name"],
                    "accuracy_minus_lora_r8": r["accuracy_minus_lora_r8"],
                    "params_fewer_than_lora_r8": fewer,
                    "accuracy_minus_full": vs_full,
                    "ge_lora_accuracy": r["accuracy_minus_lora_r8"] >= 0,
                    "ge_16x_fewer_params": fewer >= 16,
                    "within_1pt_of_full": vs_full is not None and vs_full >= -0.01})
    return out


def print_tables(rows: list[dict], targets: list[dict]) -> None:
    for task in dict.fromkeys(r["task"] for r in rows):
        print(f"\nMiniLM-L6 on {task}")
        print(format_table(
            ["arm", "lr", "trainable (excl. head)", "x fewer than LoRA", "accuracy % (mean ± std)", "seeds",
             "Δ vs LoRA r8", "Δ vs full", "train s"],
            [[r["name"], f"{r['learning_rate']:g}", r["trainable_params_excl_head"],
              r.get("params_fewer_than_lora_r8"),
              f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}", r["seeds"],
              _pts(r.get("accuracy_minus_lora_r8")), _pts(r.get("accuracy_minus_full")), r["wall_s"]]
             if "accuracy_mean" in r else [r["name"], "-", "-", "-", "error", 0, "-", "-", "-"]
             for r in rows if r["task"] == task]))
    if targets:
        print("\nTargets (SVFIT.md): SVFit >= LoRA r=8 at >= 16x fewer params, within 1 pt of full FT")
        print(format_table(
            ["task", "arm", "Δ vs LoRA (pts)", "x fewer params", "Δ vs full (pts)", "met"],
            [[t["task"], t["arm"], _pts(t["accuracy_minus_lora_r8"]), t["params_fewer_than_lora_r8"],
              _pts(t["accuracy_minus_full"]),
              "yes" if t["ge_lora_accuracy"] and t["ge_16x_fewer_params"] and t["within_1pt_of_full"] else "NO"]
             for t in targets]))


def _pts(delta: float | None) -> str:
    return "-" if delta is None else f"{100 * delta:+.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="SST-2 only, short training, no sweep (< 5 min)")
    ap.add_argument("--tasks", default=None, help="comma list (default: sst2,trec; quick: sst2)")
    ap.add_argument("--arms", default=None, help="comma list of arm names (default: all)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=None, help="runs in parallel (each with 2/jobs threads)")
    ap.add_argument("--name", default=None, help="result file name (default quality / quality_quick)")
    ap.add_argument("--resume", action="store_true", help="reuse the runs logged by an interrupted run")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (runs in parallel share the one GPU)")
    args = ap.parse_args(argv)

    started = time.time()
    settings = QUICK if args.quick else FULL
    overrides = {"tasks": args.tasks.split(",") if args.tasks else None, "seeds": args.seeds,
                 "train_size": args.train_size, "n_epochs": args.epochs, "jobs": args.jobs,
                 "device": args.device}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if settings.sweep_task and settings.sweep_task not in settings.tasks:
        settings = replace(settings, sweep_task=settings.tasks[0])
    settings = replace(settings, threads_per_job=max(1, 2 // settings.jobs))
    arms = [a for a in ARMS if not args.arms or a.name in args.arms.split(",")]
    name = args.name or ("quality_quick" if args.quick else "quality")
    runlog = RunLog(RESULTS_DIR / f"{name}.runs.tmp", args.resume, run_key)

    # Phase 1: the sweep picks each arm's learning rate. Phase 2: every (task, arm, seed) at that rate;
    # the sweep's seed-0 runs at the chosen rate are found in the run log and reused.
    chosen, sweep = select_lrs(settings, arms, runlog)
    sdict = asdict(settings)
    jobs = [{"task": t, "arm": a.name, "lr": chosen[a.name], "seed": s, "settings": sdict}
            for t in settings.tasks for a in arms if a.name in chosen for s in range(settings.seeds)]
    records = run_jobs(jobs, settings, runlog)

    rows, tasks_out = [], []
    for task in settings.tasks:
        data = task_data(task, settings.train_size, settings.heldout_size)
        head_params = head_param_count(len(data["label_names"]))
        for arm in arms:
            recs = [r for j, r in zip(jobs, records) if j["task"] == task and j["arm"] == arm.name]
            rows.append(summarise(task, arm, chosen.get(arm.name, float("nan")), recs, settings, head_params))
        tasks_out.append({"task": task, "train_size": len(data["train"]), "heldout_size": len(data["heldout"]),
                          "eval_split": data["eval_split"], "eval_size": len(data["evaluation"]),
                          "label_names": data["label_names"], "head_params": head_params})
    add_comparisons(rows)
    targets = check_targets(rows)
    print_tables(rows, targets)
    path = write_result(name, {
        "settings": {**sdict, "model": "sentence-transformers/all-MiniLM-L6-v2", "head_learning_rate": HEAD_LR,
                     "data_seed": DATA_SEED, "optimizer": "AdamW", "warmup_ratio": 0.1, "lr_scheduler": "linear",
                     "weight_decay": 0.0, "max_grad_norm": 1.0,
                     "selection": f"best held-out accuracy, seed 0, on {settings.sweep_task} (held-out slice of "
                                  "its training split); the chosen rate is used for every task"
                     if settings.sweep_task else "no sweep: the middle value of each arm's grid"},
        "tasks": tasks_out,
        "chosen_learning_rates": chosen,
        "sweep": sweep,
        "arms": rows,
        "targets": targets,
    }, started)
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
