"""Independent benchmark runs in parallel worker processes, logged so an interrupted benchmark continues.

The quality benchmarks (`quality.py`, `quality_llm.py`) train one model per (task, arm, ...) run. Each run is
one call of the benchmark's `run_one(job) -> record` in a spawned process (a clean torch each, with its own
thread count); every finished run is appended to a JSON-lines log, which `--resume` reads back.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import log


class RunLog:
    """Completed runs by key (``key(job_or_record)``: the fields that name a run), appended as JSON lines."""

    def __init__(self, path: Path, resume: bool, key: Callable[[dict], tuple]) -> None:
        self.path = path
        self.key = key
        self.done: dict[tuple, dict] = {}
        if resume and path.is_file():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("status") == "ok":
                    self.done[key(rec)] = rec
        elif path.exists():
            path.unlink()

    def get(self, job: dict) -> dict | None:
        return self.done.get(self.key(job))

    def add(self, rec: dict) -> None:
        """A finished run: logged when it succeeded, kept for this report only when it failed."""
        self.done[self.key(rec)] = rec
        if rec.get("status") != "ok":
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def run_in_workers(jobs: list[dict], runlog: RunLog, run_one: Callable[[dict], dict], workers: int, threads: int,
                   describe: Callable[[dict], str]) -> list[dict | None]:
    """Run the jobs the log does not hold yet, ``workers`` at a time with ``threads`` torch threads each;
    ``describe(record)`` is the log line of a successful run. Records come back in the order of ``jobs``."""
    todo = [j for j in jobs if runlog.get(j) is None]
    if todo:
        log(f"{len(todo)} runs to do ({len(jobs) - len(todo)} reused), {workers} at a time")
        ctx = multiprocessing.get_context("spawn")  # a clean torch in every worker
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
            for fut in cf.as_completed([pool.submit(run_one, j) for j in todo]):
                rec = fut.result()
                runlog.add(rec)
                log(describe(rec) if rec["status"] == "ok" else f"{runlog.key(rec)}: FAILED {rec.get('error')}")
    return [runlog.get(j) for j in jobs]


def add_run_arguments(ap, *, examples: str, default_name: str) -> None:  # noqa: ANN001 - an ArgumentParser
    """The flags every run-based benchmark takes beside its own: seeds, data sizes (``examples`` names what an
    example is), parallelism, device, result name, resume and workdir."""
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--train-size", type=int, default=None, help=f"training {examples}")
    ap.add_argument("--eval-size", type=int, default=None, help=f"held-out {examples}")
    ap.add_argument("--jobs", type=int, default=None, help="runs in parallel (each with 2/jobs threads)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (runs in parallel share the one GPU)")
    ap.add_argument("--name", default=None, help=f"result file name (default {default_name} / {default_name}_quick)")
    ap.add_argument("--resume", action="store_true", help="reuse the runs logged by an interrupted run")
    ap.add_argument("--workdir", default=None, help="keep the base copy and the basis store here")


def settings_from_arguments(settings, args, **more):  # noqa: ANN001, ANN201 - a benchmark's Settings dataclass
    """``settings`` with what ``add_run_arguments``' flags (and ``more``) set, and torch threads split over
    the parallel runs."""
    from dataclasses import replace

    overrides = {"seeds": args.seeds, "train_size": args.train_size, "eval_size": args.eval_size,
                 "jobs": args.jobs, "device": args.device, **more}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    return replace(settings, threads_per_job=max(1, 2 // settings.jobs))


def train_recorded(base, examples: list[dict], spec, config, out: Path, curve_keys: tuple[str, ...],  # noqa: ANN001
                   **run_options) -> tuple:
    """``run_training`` of one benchmark run, to completion -> (result, the start info, the per-step ``curve_keys``
    of every step, training seconds). ``run_options`` go to ``run_training`` (``bases``, ``reward``, ...)."""
    from benchmarks.common import Stopwatch
    from svfit_core.training import TrainingCallbacks, run_training

    started: dict = {}
    curve: list[dict] = []

    class Recorder(TrainingCallbacks):
        def on_start(self, info: dict) -> None:
            started.update(info)

        def on_step(self, metrics: dict) -> None:
            curve.append({k: metrics.get(k) for k in curve_keys})

    with Stopwatch() as sw:
        result = run_training(base, examples, None, spec, config, out, callbacks=Recorder(), **run_options)
    if result.ended_by != "completion":
        raise RuntimeError(f"training ended by {result.ended_by}")
    return result, started, curve, sw.seconds


def gain_targets(rows: list[dict], gain_key: str, metric: str, *, methods: tuple[str, ...] = ("svfit", "lora", "full"),
                 gain_in_sd: float = 2.0, fewer_params_factor: float = 10) -> list[dict]:
    """The targets of a benchmark that trains from a starting model, per task, each as {name, value, limit,
    unit, met}: every method's default raises ``metric`` by more than ``gain_in_sd`` times its spread
    (``row["gain_sd"]``, described by ``row["gain_sd_kind"]``), and SVFit's gain is at least LoRA's at
    ``fewer_params_factor``× fewer trainable parameters. ``rows`` are the summary rows (``task``, ``name``,
    ``status``, ``gain_key``, ``trainable_params``)."""
    targets = []
    for task in dict.fromkeys(r["task"] for r in rows):
        by = {r["name"]: r for r in rows if r["task"] == task and r.get("status") == "ok" and gain_key in r}
        for name in methods:
            if name in by:
                gain, limit = by[name][gain_key], gain_in_sd * by[name]["gain_sd"]
                targets.append({"name": f"{task}_{name}_gain", "value": gain, "limit": limit,
                                "unit": f"{metric} (> {gain_in_sd:g} x {by[name]['gain_sd_kind']})",
                                "met": gain > limit})
        if "svfit" in by and "lora" in by:
            svfit, lora = by["svfit"], by["lora"]
            diff = svfit[gain_key] - lora[gain_key]
            targets.append({"name": f"{task}_svfit_gain_minus_lora", "value": diff, "limit": 0.0,
                            "unit": f"{metric} (>=)", "met": diff >= 0})
            fewer = lora["trainable_params"] / max(1, svfit["trainable_params"])
            targets.append({"name": f"{task}_lora_params_over_svfit", "value": fewer, "limit": fewer_params_factor,
                            "unit": "x (>=)", "met": fewer >= fewer_params_factor})
    return targets
