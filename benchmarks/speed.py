"""Speed and memory of one training step: SVFit against the frozen floor, LoRA r=8 and full fine-tuning.

    python -m benchmarks.speed [--quick]

What one "step" is: forward + backward + optimizer step (AdamW) + zero_grad, on a fixed random batch.
The **frozen floor** is the cheapest thing any adapter method can cost: every weight frozen, forward and
backward down to the input embeddings (which are made to require grad). Every arm is reported as a ratio
to the floor measured in the same run.

Arms, per model: floor; full fine-tuning; and on the q,v targets and on all-linear targets: SVFit at a
small fixed rank, SVFit at r = k (every singular value), LoRA r=8 (HF PEFT, alpha 16, no dropout).
Classification models train their head in every arm except the floor (the head's cost is negligible).

Two measurements per model, each in fresh subprocesses:
- **Time**: every arm is built in one process, each on its own copy of the base model, and the arms are
  stepped round-robin (round i starts at arm i mod n), after untimed warm-up rounds. The figure is the
  median step per arm. On a machine shared with other work, load then falls on all arms alike, so the
  ratios hold even when the absolute times move.
- **Memory**: each arm alone in its own process. CPU: peak resident memory (the kernel's VmHWM, reset
  after a warm-up step so the optimizer state exists) minus the resident memory of the loaded base model
  before the arm was set up; it counts what the method adds: stored bases or LoRA factors, gradients,
  optimizer state and the activations kept for backward. GPU: torch.cuda.max_memory_allocated minus what
  the base model holds.

Models: MiniLM-L6 (sequence classification, batch 16, seq 128) and SmolLM2-135M (causal LM, batch 4,
seq 128). --quick replaces SmolLM2 with a random Llama of SmolLM2's shape halved (hidden 288, 15 layers,
intermediate 768, vocabulary 24,576) and times 10 steps per arm instead of 30.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.common import (
    REPO_ROOT,
    format_table,
    log,
    median,
    minilm_path,
    peak_rss_mb,
    quantile,
    reset_peak_rss,
    rss_mb,
    smollm2_location,
    write_result,
)

# Target module lists, spelled out so that SVFit and PEFT adapt exactly the same layers. "all" is every
# linear layer inside the transformer blocks (not the embeddings, pooler, head or lm_head), which is what
# SVFitConfig(target_modules="all-linear") means.
BERT_QV = ["query", "value"]
BERT_ALL = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_QV = ["q_proj", "v_proj"]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SMALL_RANK = 16  # "SVFit small r": the rank a multi-adapter server would keep (SVFIT.md, serving)
LORA_RANK = 8


@dataclass
class ModelCase:
    """One model the arms run on."""

    key: str
    label: str
    task: str  # "classification" | "causal"
    batch: int
    seq: int
    targets: dict[str, list[str]]
    source: str = ""  # a folder the worker loads with from_pretrained (filled in by prepare_models)


@dataclass
class Arm:
    """One measured configuration: method ∈ floor | full | svfit | lora."""

    name: str
    method: str
    targets: str | None = None  # "qv" | "all"
    rank: int | None = None  # None with svfit means r = k


@dataclass
class WorkerSpec:
    mode: str  # "memory" (one arm) | "timing" (every arm, interleaved)
    case: ModelCase
    arms: list[Arm]
    warmup: int
    steps: int
    threads: int
    device: str
    seed: int = 0


def arms_for() -> list[Arm]:
    arms = [Arm("floor", "floor"), Arm("full", "full")]
    for t in ("qv", "all"):
        arms += [
            Arm(f"svfit_r{SMALL_RANK}_{t}", "svfit", t, SMALL_RANK),
            Arm(f"svfit_rk_{t}", "svfit", t, None),
            Arm(f"lora_r{LORA_RANK}_{t}", "lora", t, LORA_RANK),
        ]
    return arms


# ---------------------------------------------------------------------------------------- the workers
# Both run inside fresh subprocesses and print one JSON line. The memory worker builds one arm and reads
# its peak; the timing worker builds every arm of a model side by side and steps them in turn.


def _load(case: ModelCase, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if case.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(case.source, num_labels=2)
    else:
        model = AutoModelForCausalLM.from_pretrained(case.source, dtype=torch.float32)
    return model.to(device)


def _head_names(model) -> list[str]:
    """Parameter names of a classification head (trained by every arm but the floor)."""
    return [n for n, _ in model.named_parameters() if n.split(".")[0] in ("classifier", "score")]


def _set_up_arm(model, case: ModelCase, arm: Arm):
    """Freeze/wrap ``model`` for ``arm``; returns the module to call."""
    heads = set(_head_names(model))
    if arm.method == "floor":
        model.requires_grad_(False)
        return model
    if arm.method == "full":
        model.requires_grad_(True)
        return model
    targets = case.targets[arm.targets]
    if arm.method == "svfit":
        from svfit_core import SVFitConfig, inject_svfit

        model.requires_grad_(False)
        wrapped = inject_svfit(model, SVFitConfig(rank=arm.rank, target_modules=targets, modules_to_save=[]))
    elif arm.method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=arm.rank, lora_alpha=2 * arm.rank, lora_dropout=0.0, target_modules=targets)
        wrapped = get_peft_model(model, cfg)
    else:
        raise ValueError(arm.method)
    # The head is trained in place for both methods (modules_to_save=[] / no PEFT task type), so neither
    # pays for a copy of it and the comparison is only about the adapted layers.
    for n, p in model.named_parameters():
        if n in heads:
            p.requires_grad_(True)
    return wrapped


class _ArmRunner:
    """One arm ready to step: its model, optimizer and a fixed random batch."""

    def __init__(self, base, case: ModelCase, arm: Arm, device: str, seed: int) -> None:
        import torch

        self.arm = arm
        t0 = time.perf_counter()
        self.model = _set_up_arm(base, case, arm)
        self.setup_s = time.perf_counter() - t0
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        head = set(_head_names(base))
        self.trainable = sum(p.numel() for p in params)
        self.head_params = sum(p.numel() for n, p in base.named_parameters() if n in head and p.requires_grad)
        self.svfit_ranks = [m.rank for m in self.model.modules() if type(m).__name__ == "SVFitLayer"]
        # The learning rate is irrelevant to timing; a small one keeps the weights sane over many steps.
        self.opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0) if params else None
        self.embed = base.get_input_embeddings()
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(100, min(base.config.vocab_size, 30000), (case.batch, case.seq), generator=g)
        labels = torch.randint(0, 2, (case.batch,), generator=g) if case.task == "classification" else ids.clone()
        self.ids, self.mask, self.labels = ids.to(device), torch.ones_like(ids).to(device), labels.to(device)
        self.cuda = device.startswith("cuda")

    def step(self) -> float:
        """One forward + backward + optimizer step; returns its wall time in seconds."""
        import torch

        t = time.perf_counter()
        if self.arm.method == "floor":
            # Backward must reach the inputs, so the embeddings' output is a leaf that requires grad.
            x = self.embed(self.ids).detach().requires_grad_(True)
            out = self.model(inputs_embeds=x, attention_mask=self.mask, labels=self.labels)
        else:
            out = self.model(input_ids=self.ids, attention_mask=self.mask, labels=self.labels)
        out.loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t


def memory_worker(spec: WorkerSpec) -> dict[str, Any]:
    """Peak memory of one arm, alone in this process (see the module docstring for what is counted)."""
    import torch

    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    cuda = spec.device.startswith("cuda")
    base = _load(spec.case, spec.device)
    gc.collect()
    rss_base = rss_mb()
    gpu_base = torch.cuda.memory_allocated() if cuda else 0
    arm = spec.arms[0]
    runner = _ArmRunner(base, spec.case, arm, spec.device, spec.seed)
    gc.collect()
    state_mb = (torch.cuda.memory_allocated() - gpu_base) / 2**20 if cuda else rss_mb() - rss_base
    # Warm-up creates the optimizer state; the measured steps then hold everything a step ever holds.
    for _ in range(spec.warmup):
        runner.step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    hwm_reset = reset_peak_rss()
    times = [runner.step() for _ in range(spec.steps)]
    if cuda:
        peak_abs = torch.cuda.max_memory_allocated() / 2**20
        peak = peak_abs - gpu_base / 2**20
        probe = "torch.cuda.max_memory_allocated"
    else:
        peak_abs = peak_rss_mb()
        peak = peak_abs - rss_base
        probe = "VmHWM after clear_refs" if hwm_reset else "ru_maxrss (whole process)"
    return {
        "arm": arm.name, "trainable_params": runner.trainable, "head_params": runner.head_params,
        "svfit_layers": len(runner.svfit_ranks), "svfit_rank_total": sum(runner.svfit_ranks),
        "setup_s": runner.setup_s, "adapter_state_mb": state_mb, "peak_mem_mb": peak, "peak_abs_mb": peak_abs,
        "base_mb": gpu_base / 2**20 if cuda else rss_base, "mem_probe": probe, "isolated_step_s": times,
    }


def timing_worker(spec: WorkerSpec) -> dict[str, Any]:
    """Every arm of one model in this process, each on its own copy of the base model, stepped in turn:
    round i steps every arm once, starting from arm i mod n. Load from other users of the machine then
    falls on all arms alike instead of on whichever arm happened to run during a busy minute."""
    import copy

    import torch

    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    base = _load(spec.case, spec.device)
    runners = [_ArmRunner(copy.deepcopy(base), spec.case, arm, spec.device, spec.seed) for arm in spec.arms]
    del base
    gc.collect()
    times: dict[str, list[float]] = {r.arm.name: [] for r in runners}
    n = len(runners)
    for rnd in range(spec.warmup + spec.steps):
        for j in range(n):
            runner = runners[(rnd + j) % n]
            t = runner.step()
            if rnd >= spec.warmup:
                times[runner.arm.name].append(t)
    return {"step_s": times}


# ----------------------------------------------------------------------------------------- the parent


def prepare_models(quick: bool, workdir: str, which: list[str], random_smollm2: bool = False,
                   batch_scale: int = 1) -> list[ModelCase]:
    """Model cases with a folder each worker can load quickly (SmolLM2's GGUF is dequantised once).

    ``random_smollm2`` builds SmolLM2-135M's exact architecture with random weights instead of reading the
    GGUF (for a machine without the package; step time depends on shapes, not values). ``batch_scale``
    multiplies every batch size (a GPU is launch-bound at the CPU batch sizes)."""
    cases = []
    if "minilm" in which:
        b = 16 * batch_scale
        cases.append(ModelCase("minilm", f"MiniLM-L6 (cls, batch {b}, seq 128)", "classification", b, 128,
                               {"qv": BERT_QV, "all": BERT_ALL}, source=minilm_path()))
    if "smollm2" in which:
        b = 4 * batch_scale
        if quick:
            key, script, label = "smollm2_half", _HALF_LLAMA, "Llama, SmolLM2 shape halved (random"
        elif random_smollm2:
            key, script, label = "smollm2_random", _RANDOM_SMOLLM2, "SmolLM2-135M architecture (random weights"
        else:
            key, script, label = "smollm2", _DEQUANTISE, "SmolLM2-135M (GGUF dequantised to fp32"
        folder = os.path.join(workdir, key)
        log(f"preparing {label})")
        src_dir, gguf = ("", "") if (quick or random_smollm2) else smollm2_location()
        subprocess.run([sys.executable, "-c", script, folder, src_dir, gguf], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cases.append(ModelCase(key, f"{label}, causal, batch {b}, seq 128)", "causal", b, 128,
                               {"qv": LLAMA_QV, "all": LLAMA_ALL}, source=folder))
    return cases


# Dequantise the GGUF once and save fp32 safetensors, so each of the many workers loads in a second.
# transformers refuses to save a GGUF-loaded model, so the weights move into a model built from the same
# config without its quantization_config.
_DEQUANTISE = """
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
out, src, gguf = sys.argv[1:4]
gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
cfg = gguf_model.config.to_dict()
cfg.pop("quantization_config", None)
cfg = AutoConfig.for_model(**cfg)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
model.tie_weights()
model.save_pretrained(out)
"""

# SmolLM2-135M's architecture (as its GGUF declares it), random weights (seeded); and the same with every
# width, the depth and the vocabulary halved.
_RANDOM_LLAMA = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
out = sys.argv[1]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size={vocab}, hidden_size={hidden}, intermediate_size={inter},
                  num_hidden_layers={layers}, num_attention_heads=9, num_key_value_heads=3, head_dim={head_dim},
                  tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  rope_theta=100000.0)
LlamaForCausalLM(cfg).save_pretrained(out)
"""
_RANDOM_SMOLLM2 = _RANDOM_LLAMA.format(vocab=49152, hidden=576, inter=1536, layers=30, head_dim=64)
_HALF_LLAMA = _RANDOM_LLAMA.format(vocab=24576, hidden=288, inter=768, layers=15, head_dim=32)


def run_worker(spec: WorkerSpec, timeout: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--worker", json.dumps(asdict(spec))],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_ROOT, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec.mode} worker on {spec.case.key} ({', '.join(a.name for a in spec.arms)}) "
                           f"failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def summarise(case: ModelCase, arm: Arm, mem: dict[str, Any], steps: list[float]) -> dict[str, Any]:
    return {
        "model": case.key,
        "name": arm.name,
        "method": arm.method,
        "targets": arm.targets,
        "target_modules": case.targets.get(arm.targets) if arm.targets else None,
        "rank": "k" if arm.method == "svfit" and arm.rank is None else arm.rank,
        "trainable_params": mem["trainable_params"],
        "trainable_params_excl_head": mem["trainable_params"] - mem["head_params"],
        "head_params": mem["head_params"],
        "svfit_layers": mem["svfit_layers"],
        "svfit_rank_total": mem["svfit_rank_total"],
        "steps_timed": len(steps),
        "step_ms_median": 1000 * median(steps),
        "step_ms_p25": 1000 * quantile(steps, 0.25),
        "step_ms_p75": 1000 * quantile(steps, 0.75),
        # From the memory worker, where the arm ran alone: a second, unpaired view of its speed.
        "isolated_step_ms_median": 1000 * median(mem["isolated_step_s"]),
        "peak_mem_mb": mem["peak_mem_mb"],
        "peak_abs_mb": mem["peak_abs_mb"],
        "adapter_state_mb": mem["adapter_state_mb"],
        "base_model_mb": mem["base_mb"],
        "setup_s": mem["setup_s"],
        "mem_probe": mem["mem_probe"],
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    by = {r["name"]: r for r in rows}
    floor, full = by.get("floor"), by.get("full")
    for r in rows:
        r["ratio_to_floor"] = r["step_ms_median"] / floor["step_ms_median"] if floor else None
        r["ratio_to_full"] = r["step_ms_median"] / full["step_ms_median"] if full else None
        lora = by.get(f"lora_r{LORA_RANK}_{r['targets']}") if r["targets"] else None
        r["ratio_to_lora_r8"] = r["step_ms_median"] / lora["step_ms_median"] if lora else None
        r["mem_ratio_to_lora_r8"] = r["peak_mem_mb"] / lora["peak_mem_mb"] if lora else None


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of SVFIT.md ("Cost model and targets"), measured; `met` is a plain comparison."""
    by = {r["name"]: r for r in rows}
    model = rows[0]["model"]
    out = []

    def add(what: str, value: float, limit: float) -> None:
        out.append({"model": model, "target": what, "value": round(value, 3), "limit": round(limit, 3),
                    "met": bool(value <= limit)})

    qv_k = by["svfit_rk_qv"]
    add("q,v r=k: step / floor <= 1.10", qv_k["ratio_to_floor"], 1.10)
    add("q,v r=k: step / LoRA r=8 step <= 1", qv_k["ratio_to_lora_r8"], 1.0)
    add(f"all-linear r={SMALL_RANK}: step / LoRA r=8 step <= 1", by[f"svfit_r{SMALL_RANK}_all"]["ratio_to_lora_r8"], 1.0)
    add("all-linear r=k: step / full FT step <= 0.8", by["svfit_rk_all"]["ratio_to_full"], 0.8)
    for t in ("qv", "all"):
        for name in (f"svfit_r{SMALL_RANK}_{t}", f"svfit_rk_{t}"):
            add(f"{name}: peak memory / LoRA r=8 ({t}) <= 1", by[name]["mem_ratio_to_lora_r8"], 1.0)
    return out


def print_tables(cases: list[ModelCase], arms_out: list[dict[str, Any]], targets: list[dict[str, Any]]) -> None:
    for case in cases:
        rows = [r for r in arms_out if r["model"] == case.key]
        print(f"\n{case.label}")
        print(format_table(
            ["arm", "trainable (excl. head)", "step ms (median)", "x floor", "x LoRA r8", "x full",
             "peak mem MB", "mem x LoRA r8"],
            [[r["name"], r["trainable_params_excl_head"], r["step_ms_median"], r["ratio_to_floor"],
              r["ratio_to_lora_r8"], r["ratio_to_full"], r["peak_mem_mb"], r["mem_ratio_to_lora_r8"]]
             for r in rows]))
    print("\nTargets (SVFIT.md)")
    print(format_table(["model", "target", "measured", "limit", "met"],
                       [[t["model"], t["target"], t["value"], t["limit"], "yes" if t["met"] else "NO"]
                        for t in targets]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and a half-size random Llama (< 5 min)")
    ap.add_argument("--models", default="minilm,smollm2", help="comma list of minilm, smollm2")
    ap.add_argument("--arms", default=None, help="comma list of arm names (default: all; floor always runs)")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (steps per arm)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    ap.add_argument("--mem-steps", type=int, default=None, help="steps the memory worker measures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--name", default=None, help="result file name (default speed / speed_quick)")
    ap.add_argument("--random-smollm2", action="store_true",
                    help="SmolLM2-135M's architecture with random weights instead of the GGUF")
    ap.add_argument("--batch-scale", type=int, default=1, help="multiply every batch size (GPU runs)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        raw = json.loads(args.worker)
        spec = WorkerSpec(case=ModelCase(**raw.pop("case")), arms=[Arm(**a) for a in raw.pop("arms")], **raw)
        result = memory_worker(spec) if spec.mode == "memory" else timing_worker(spec)
        print(json.dumps(result))
        return 0

    import torch

    started = time.time()
    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (10 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    mem_steps = args.mem_steps or (1 if args.quick else 3)
    name = args.name or ("speed_quick" if args.quick else "speed")
    arms = arms_for()
    if args.arms:
        wanted = set(args.arms.split(","))
        arms = [a for a in arms if a.name in wanted or a.method == "floor"]

    workdir = tempfile.mkdtemp(prefix="svfit-speed-")
    try:
        cases = prepare_models(args.quick, workdir, args.models.split(","), args.random_smollm2,
                               args.batch_scale)
        arms_out: list[dict[str, Any]] = []
        targets: list[dict[str, Any]] = []
        for case in cases:
            mems = {}
            for arm in arms:
                log(f"{case.key} memory: {arm.name}")
                mems[arm.name] = run_worker(WorkerSpec("memory", case, [arm], 1, mem_steps, args.threads, device),
                                            timeout=3600)
                log(f"  peak +{mems[arm.name]['peak_mem_mb']:.0f} MB, {mems[arm.name]['trainable_params']:,} "
                    f"trainable")
            log(f"{case.key} timing: {len(arms)} arms x {steps} steps, interleaved")
            timing = run_worker(WorkerSpec("timing", case, arms, warmup, steps, args.threads, device), timeout=7200)
            rows = [summarise(case, a, mems[a.name], timing["step_s"][a.name]) for a in arms]
            add_ratios(rows)
            for r in rows:
                log(f"  {r['name']}: {r['step_ms_median']:.0f} ms ({r['ratio_to_floor']:.2f}x floor)")
            arms_out += rows
            if len(arms) == len(arms_for()):
                targets += check_targets(rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_tables(cases, arms_out, targets)
    path = write_result(name, {
        "settings": {"quick": args.quick, "device": device, "threads": args.threads, "warmup_rounds": warmup,
                     "timed_steps": steps, "memory_steps": mem_steps, "optimizer": "AdamW (torch default)",
                     "timing": "all arms of a model in one process, stepped round-robin; median per arm",
                     "memory": "one fresh process per arm; peak minus the loaded base model",
                     "svfit_small_rank": SMALL_RANK, "batch_scale": args.batch_scale,
                     "random_smollm2": args.random_smollm2,
                     "lora": {"r": LORA_RANK, "alpha": 2 * LORA_RANK, "dropout": 0.0},
                     "models": [asdict(c) | {"source": None} for c in cases]},
        "arms": arms_out,
        "targets": targets,
    }, started)
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
