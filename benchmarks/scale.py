"""What a 1–8B fine-tuning job costs: every figure measured per decoder layer at real widths, then
extrapolated to the real depth.

    python -m benchmarks.scale [--device cpu|cuda] [--quick] [--name NAME]

Models: Llama-shaped, random bf16 weights, real widths, two decoder layers (decoder layer 1 holds a copy of
layer 0's weights, so one set of SVDs serves both; sizes and times depend on shapes, not values):
SmolLM2-135M (hidden 576, 30 layers), Llama-3.2-1B (2,048, 16 layers), Llama-3.1-8B (4,096, 32 layers).
The real depth only enters the extrapolation.

Arms per shape: SVFit r ∈ {64, 256, k} on q,v and on all seven projections, LoRA r=16 (HF PEFT, α=32) on
both, and full fine-tuning as the library runs it (fp32 weights, bf16 autocast). Per decoder layer, from the
tensors and files the library builds:
- bytes of the base weights, the bases (U_r, V_r, s as `SVFitLayer` holds them), the trained tensors, their
  gradients and AdamW's two moments (a real AdamW step); checkpoint files (adapter + training state, written
  with the library's writers) compact (bases named by key in a `DirectoryBasisStore`) and self-contained
  (U, V, s inside); artifacts (the compact SVFit adapter, `export_peft_lora(rank=64)`). A per-layer file
  size is the size with two adapted layers minus the size with one, so fixed parts (JSON, RNG state) are
  counted once;
- the activation peak of one forward + backward of the decoder stack at 2,048 tokens, without and with
  gradient checkpointing (non-reentrant, as the training loop uses it), under bf16 autocast: with 1 and 2
  layers, the difference being one layer's share. CPU: `LiveTensorBytes` below (every tensor storage an op
  creates, counted until it is freed); CUDA: `torch.cuda.max_memory_allocated`. Parameter gradients are
  dropped as they arrive (they are counted in their own column);
- step time of one decoder layer's seven linears (forward + backward; SVFit through
  `svfit_core.layer.svfit_linear`, LoRA as x Wᵀ + (x Aᵀ) Bᵀ·scale, full as a linear with a weight gradient,
  non-target projections frozen) as a ratio to LoRA r=16 on the same targets, all arms stepped round-robin;
  next to it the ratio the library's cost rule (`plan_cost` / `choose_plan`) predicts for the same shapes
  at the measured T and at T = 4,096.
Per shape: SVD seconds for each distinct matrix shape (full `torch.linalg.svd`, `torch.svd_lowrank` with
q = r + 10 and 2 power iterations, `eigh` of the smaller Gram matrix) and how far the fast ones land from
the full SVD; the time of a first `inject_svfit` of one decoder layer into an empty basis store against a
second one from the filled store; and the loss path's peak: full fp32 logits against the chunked loss.

Peak training memory of a job (extrapolated; checkpointing on; one micro-batch of 2,048 tokens, 8 of them
accumulated per optimizer step, so gradients stay alive across micro-batches):
    weights + bases + trained tensors + gradients + AdamW moments + activation peak + loss-path peak.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import math
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.common import REPO_ROOT, format_table, log, median, quantile, smollm2_location, write_result
from svfit_core.bases import DirectoryBasisStore, basis_key
from svfit_core.config import SVFitConfig
from svfit_core.export import export_peft_lora
from svfit_core.layer import BALANCE, choose_plan, plan_cost, svfit_linear, weight_sha256
from svfit_core.model import SVFitModel, inject_svfit
from svfit_core.serialization import save_svfit_adapter
from svfit_core.targets import resolve_targets
from svfit_core.training.checkpointing import TrainingState, capture_rng, flatten_optimizer, save_training_state
from svfit_core.training.loss import chunked_cross_entropy
from svfit_core.training.memory import activation_bytes_per_token
from svfit_core.training.param_groups import build_param_groups

GIB = 2**30
MB = 10**6
BUILT_LAYERS = 2
# Projection -> the block submodule that holds it, in a Llama decoder layer's order.
PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
TARGETS = {"qv": ("q_proj", "v_proj"), "all": tuple(PROJECTIONS)}


# ------------------------------------------------------------------------------------------ what runs


@dataclass(frozen=True)
class ModelShape:
    key: str
    label: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int  # the real depth: only used to extrapolate
    tied: bool  # input embeddings and lm_head share one matrix

    def matrices(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each projection of one decoder layer."""
        h, i = self.hidden, self.intermediate
        kv = self.kv_heads * (h // self.heads)
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


SMOLLM2 = ModelShape("smollm2_135m", "SmolLM2-135M", 576, 1536, 9, 3, 49152, 30, True)
LLAMA32_1B = ModelShape("llama32_1b", "Llama-3.2-1B", 2048, 8192, 32, 8, 128256, 16, True)
LLAMA31_8B = ModelShape("llama31_8b", "Llama-3.1-8B", 4096, 14336, 32, 8, 128256, 32, False)
SHAPES = {s.key: s for s in (SMOLLM2, LLAMA32_1B, LLAMA31_8B)}


@dataclass(frozen=True)
class Arm:
    name: str
    method: str  # "svfit" | "lora" | "full"
    targets: str  # "qv" | "all"
    rank: int | None = None  # svfit: None means r = k; lora: its rank

    @property
    def rank_label(self) -> str | int | None:
        return "k" if self.method == "svfit" and self.rank is None else self.rank


LORA_RANK = 16
SVFIT_RANKS = (64, 256, None)
ARMS = (
    *(Arm(f"svfit_r{r or 'k'}_{t}", "svfit", t, r) for t in ("qv", "all") for r in SVFIT_RANKS),
    Arm(f"lora_r{LORA_RANK}_qv", "lora", "qv", LORA_RANK),
    Arm(f"lora_r{LORA_RANK}_all", "lora", "all", LORA_RANK),
    Arm("full", "full", "all"),
)


@dataclass(frozen=True)
class Settings:
    device: str = "cpu"
    act_tokens: int = 2048  # one micro-batch: activation and loss-path peaks
    micro_batches: int = 8  # accumulated per optimizer step (gradients stay alive across them)
    step_tokens: int = 512  # T of the linear-layer step timing
    step_rounds: int = 10
    warmup_rounds: int = 2
    rule_tokens: int = 4096  # the T the cost-rule figures are stated for
    svd_ranks: tuple[int, ...] = (64, 256)
    serving_rank: int = 64  # r′ of the PEFT LoRA export
    real_weights: bool = True  # also check the fast SVDs on SmolLM2-135M's trained weights, when installed

    @classmethod
    def for_run(cls, device: str, quick: bool) -> Settings:
        cuda = device == "cuda"
        if quick:
            return cls(device, act_tokens=256, step_tokens=512 if cuda else 128, step_rounds=5, warmup_rounds=1,
                       real_weights=False)
        return cls(device, step_tokens=4096 if cuda else 512, step_rounds=20, warmup_rounds=3 if cuda else 2)


# ------------------------------------------------------------------------------------- small helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _projection(block: nn.Module, proj: str) -> nn.Module:
    return getattr(getattr(block, PROJECTIONS[proj]), proj)


def layer_targets(targets: str, layers: Iterable[int]) -> list[str]:
    """Target names for SVFit and PEFT alike ("layers.0.self_attn.q_proj" matches by name suffix)."""
    return [f"layers.{i}.{PROJECTIONS[p]}.{p}" for i in layers for p in TARGETS[targets]]


def _in_layer0(name: str) -> bool:
    return ".layers.0." in f".{name}"


def _split(one: int, two: int) -> tuple[int, int]:
    """(per layer, fixed) from a measurement with one and with two decoder layers."""
    per_layer = two - one
    return per_layer, one - per_layer


def build_model(shape: ModelShape, device: torch.device) -> nn.Module:
    """A random bf16 Llama of ``shape`` with BUILT_LAYERS decoder layers, all holding layer 0's weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=BUILT_LAYERS, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden // shape.heads, tie_word_embeddings=shape.tied, max_position_embeddings=8192,
        rms_norm_eps=1e-5, use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    layers = model.model.layers
    with torch.no_grad():
        for layer in layers[1:]:
            layer.load_state_dict(layers[0].state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def _unload_svfit(svfit_model: SVFitModel) -> None:
    """Put the original layers back without merging: every arm runs on the same base model in turn."""
    inner = svfit_model.model
    for name, layer in svfit_model.svfit_layers().items():
        parent, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent), child, layer.base_layer)


def _checkpointing(model: nn.Module, on: bool) -> None:
    # As the training loop enables it: non-reentrant, so frozen embeddings need no input gradient.
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


# ---------------------------------------------------------------------------------- the memory probe


class LiveTensorBytes(TorchDispatchMode):
    """CPU memory probe: bytes of the tensor storages created inside the block that are still alive, and
    their peak.

    Every op's outputs pass through here (backward and checkpoint recomputation included); a storage is
    counted when it first appears and uncounted when it is freed (a weak reference's callback: PyTorch keeps
    one Python object per live storage). Storages that existed before the block (weights, bases, inputs) are
    never counted, even when an op returns a view of one. That is what the CUDA allocator's
    max_memory_allocated reports, without its block rounding and workspaces.
    """

    def __init__(self, existing: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self._existing = [t.untyped_storage() for t in existing]  # kept alive, so their ids stay theirs
        self._before = {id(s) for s in self._existing}
        self._alive: dict[int, weakref.ref] = {}
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._before or key in self._alive:
            return
        size = storage.nbytes()
        self._alive[key] = weakref.ref(storage, functools.partial(self._freed, key, size))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _freed(self, key: int, size: int, _ref: weakref.ref) -> None:
        if self._alive.pop(key, None) is not None:
            self.live -= size


def peak_bytes(fn: Callable[[], None], existing: Iterable[torch.Tensor], device: torch.device) -> int:
    """Peak bytes ``fn`` allocates beyond what was allocated before it (it must free what it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorBytes(existing) as probe:
        fn()
    return probe.peak


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None


def measure_activations(model: nn.Module, shape: ModelShape, settings: Settings) -> dict[str, int]:
    """Peak bytes of one forward + backward of the decoder stack (decoder layers and final norm) on
    ``act_tokens`` tokens under bf16 autocast (as the training loop runs a bf16 base), with 1 and 2 layers,
    checkpointing off and on.

    The stack starts from precomputed input embeddings: the embedding's own backward (a dense vocab × hidden
    gradient when it trains) is a fixed transient that would otherwise set the peak whatever the depth."""
    device = torch.device(settings.device)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(shape.vocab, (1, settings.act_tokens), generator=gen, device=device)
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids).detach()  # (1, T, H) in the embedding's dtype
    grad = torch.randn(1, settings.act_tokens, shape.hidden, generator=gen, device=device, dtype=embeds.dtype)
    existing = [*model.parameters(), *model.buffers(), ids, embeds, grad]
    hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in model.parameters() if p.requires_grad]
    body = model.model

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            hidden = body(inputs_embeds=inputs, use_cache=False).last_hidden_state  # (1, T, H)
        hidden.backward(grad.to(hidden.dtype))
        inputs.grad = None

    out = {}
    try:
        for ckpt in (False, True):
            _checkpointing(model, ckpt)
            # transformers' checkpointing makes the embedding output require grad (enable_input_require_grads),
            # and the first layer then keeps what its input gradient needs: mirror that, and only that.
            inputs = embeds.detach().requires_grad_(ckpt)
            for n in (1, 2):
                model.config.num_hidden_layers = n  # the stack runs layers[:n]
                out[f"{'ckpt' if ckpt else 'no_ckpt'}_{n}"] = peak_bytes(step, existing, device)
    finally:
        model.config.num_hidden_layers = BUILT_LAYERS
        _checkpointing(model, False)
        for h in hooks:
            h.remove()
    return out


# ----------------------------------------------------------------------------------------- the SVDs


def _angles(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(largest principal angle in degrees, mean cos² of all of them) between the column spans of ``a`` and
    ``b`` (orthonormal columns). The largest angle is set by the directions at the rank boundary, where
    neighbouring singular values are close; the mean cos² is the share of the subspace both agree on."""
    cos = torch.linalg.svdvals(a.mT @ b).clamp(-1.0, 1.0)
    return math.degrees(math.acos(float(cos.min()))), float(cos.square().mean())


def _agreement(ref: tuple, got: tuple, r: int) -> dict[str, float]:
    """How far a fast method's top-r triplets land from the full SVD's."""
    (u, s, v), (u2, s2, v2) = ref, got
    rel = (s2[:r] - s[:r]).abs() / s[:r].clamp_min(torch.finfo(s.dtype).tiny)
    angle_u, overlap_u = _angles(u[:, :r], u2[:, :r])
    angle_v, overlap_v = _angles(v[:, :r], v2[:, :r])
    return {"r": r, "s_rel_err_max": float(rel.max()), "s_rel_err_median": float(rel.median()),
            "angle_u_deg": angle_u, "angle_v_deg": angle_v, "overlap_u": overlap_u, "overlap_v": overlap_v}


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _timed_best(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``_timed``, repeated (best of 3) when a call takes under a second: short calls are the noisy ones."""
    out, best = _timed(fn, device)
    for _ in range(2 if best < 1.0 else 0):
        out, secs = _timed(fn, device)
        best = min(best, secs)
    return out, best


def _gram_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD through eigh of the smaller Gram matrix: the other side's vectors are A v / s."""
    m, n = a.shape
    lam, q = torch.linalg.eigh(a @ a.mT if m <= n else a.mT @ a)  # ascending
    lam, q = lam.flip(0), q.flip(1)
    s = lam.clamp_min(0).sqrt()
    other = (a.mT @ q if m <= n else a @ q) / s.clamp_min(torch.finfo(s.dtype).tiny)
    return (q, s, other) if m <= n else (other, s, q)


def svd_study(weights: dict[str, torch.Tensor], settings: Settings) -> list[dict[str, Any]]:
    """Seconds and agreement of the full SVD, the randomized SVD and the Gram eigh, per distinct shape."""
    device = torch.device(settings.device)
    warm = torch.randn(320, 256, device=device)  # first calls load solver kernels: keep that out of the timings
    torch.linalg.svd(warm, full_matrices=False), torch.svd_lowrank(warm, q=8, niter=2), _gram_eigh(warm)
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, w in weights.items():
        by_shape.setdefault(tuple(w.shape), []).append(name)
    rows = []
    for (m, n), names in by_shape.items():
        a = weights[names[0]].detach().float()  # (m, n)
        k = min(m, n)
        (u, s, vh), full_s = _timed_best(lambda: torch.linalg.svd(a, full_matrices=False), device)
        ref = (u, s, vh.mT)
        row: dict[str, Any] = {"shape": [m, n], "matrices": names, "k": k, "full_svd_s": full_s}
        for r in settings.svd_ranks:
            if r >= k:
                row[f"lowrank_r{r}"] = None  # nothing to approximate: r = k needs the full SVD
                continue
            def lowrank(r: int = r) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                torch.manual_seed(0)  # the same random sketch on every repeat
                return torch.svd_lowrank(a, q=min(r + 10, k), niter=2)

            got, secs = _timed_best(lowrank, device)
            row[f"lowrank_r{r}"] = {"seconds": secs, **_agreement(ref, got, r)}
        got, secs = _timed_best(lambda: _gram_eigh(a), device)
        row["gram_eigh"] = {"seconds": secs,
                            "agreement": [_agreement(ref, got, r) for r in (*settings.svd_ranks, k) if r <= k]}
        rows.append(row)
        log(f"  SVD {m}x{n}: full {full_s:.1f} s, eigh {secs:.1f} s")
        del u, s, vh, ref, got, a
    return rows


def real_weights_study(settings: Settings) -> dict[str, Any]:
    """The same study on SmolLM2-135M-Instruct's trained weights (GGUF, dequantised): random weights have a
    flat spectrum, the worst case for a randomized SVD; trained ones decay."""
    try:
        from transformers import AutoModelForCausalLM

        folder, gguf = smollm2_location()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    except (RuntimeError, OSError, ImportError, ValueError) as exc:
        return {"skipped": f"{type(exc).__name__}: {exc}"[:300]}
    layer = len(model.model.layers) // 2
    block = model.model.layers[layer]
    weights = {p: _projection(block, p).weight.detach().to(settings.device) for p in PROJECTIONS}
    del model
    return {"weights": f"SmolLM2-135M-Instruct Q4_1 GGUF, dequantised, decoder layer {layer}",
            "rows": svd_study(weights, settings)}


# ------------------------------------------------------------------------------------ the basis store


def basis_reuse(model: nn.Module, store: DirectoryBasisStore, device: torch.device) -> dict[str, Any]:
    """Seconds of a first inject_svfit of decoder layer 0 (all seven projections, r = k) into an empty store
    against a second one of the same weights from the filled store."""
    config = SVFitConfig(rank=None, target_modules=layer_targets("all", (0,)))
    names = resolve_targets(model, config.target_modules)
    marks: list[float] = []

    def progress(done: int, total: int) -> None:
        _sync(device)
        marks.append(time.perf_counter())

    _sync(device)
    start = time.perf_counter()
    svfit_model = inject_svfit(model, config, bases=store, on_progress=progress)
    _sync(device)
    first = time.perf_counter() - start
    _unload_svfit(svfit_model)
    svfit_model, second = _timed(lambda: inject_svfit(model, config, bases=store), device)
    _unload_svfit(svfit_model)
    per_matrix = {n: b - a for n, a, b in zip(names, [start, *marks[:-1]], marks, strict=True)}
    entry = store.load(next(iter(svfit_model.basis_keys.values())))
    return {"first_s": first, "second_s": second, "ratio": second / first, "first_per_matrix_s": per_matrix,
            "store_bytes_per_layer": _dir_bytes(store.root),
            "store_dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in entry.items()}}


def fill_smaller_ranks(model: nn.Module, store: DirectoryBasisStore, ranks: Iterable[int]) -> None:
    """Store the r-rank bases of decoder layer 0 (= layer 1) as slices of its r = k entries: exactly what
    truncated_svd keeps (the top r of the same SVD), without running the SVD again."""
    block = model.model.layers[0]
    for proj in PROJECTIONS:
        digest = weight_sha256(_projection(block, proj).weight)
        full = store.load(basis_key(digest, False, SVFitConfig(rank=None)))
        for r in ranks:
            rr = min(r, full["s"].numel())
            store.save(basis_key(digest, False, SVFitConfig(rank=r)),
                       {"U": full["U"][:, :rr].contiguous(), "s": full["s"][:rr].contiguous(),
                        "V": full["V"][:, :rr].contiguous()})


# --------------------------------------------------------------------------------------- the loss path


def logits_path(model: nn.Module, shape: ModelShape, settings: Settings) -> dict[str, int]:
    """Peak bytes of lm_head + cross-entropy (forward and backward to the hidden states) for one micro-batch:
    full fp32 logits against the library's chunked loss."""
    device = torch.device(settings.device)
    gen = torch.Generator(device=device).manual_seed(0)
    t = settings.act_tokens
    hidden = torch.randn(t, shape.hidden, generator=gen, device=device, dtype=torch.bfloat16).requires_grad_(True)
    targets = torch.randint(shape.vocab, (t,), generator=gen, device=device)
    head = model.lm_head
    existing = [*model.parameters(), *model.buffers(), hidden, targets]

    def full() -> None:
        F.cross_entropy(head(hidden).float(), targets, reduction="sum").backward()
        hidden.grad = None

    def chunked() -> None:
        chunked_cross_entropy(hidden, targets, head)[0].backward()
        hidden.grad = None

    return {"tokens": t, "fp32_logits_bytes": t * shape.vocab * 4,
            "full_logits_peak_bytes": peak_bytes(full, existing, device),
            "chunked_peak_bytes": peak_bytes(chunked, existing, device)}


# ------------------------------------------------------------------------------------- files on disk


def _optimizer(model: nn.Module, body_name: str, decay_body: bool) -> torch.optim.AdamW:
    """AdamW over the trainable parameters as the training loop groups them, after one step (so its two
    moments exist); the gradients are zeros."""
    groups = build_param_groups(model, [], body_name=body_name, lr=1e-3, head_lr=1e-3, weight_decay=0.0,
                                decay_body=decay_body)
    optimizer = torch.optim.AdamW(groups)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _state_bytes(optimizer: torch.optim.Optimizer, keep: Callable[[str], bool]) -> int:
    names = [n for g in optimizer.param_groups for n in g["param_names"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return sum(_nbytes(v for v in optimizer.state[p].values() if isinstance(v, torch.Tensor))
               for n, p in zip(names, params, strict=True) if keep(n))


def _save_training_state(folder: Path, optimizer: torch.optim.Optimizer) -> int:
    """What a checkpoint adds to the adapter (checkpointing.py): optimizer tensors by name, RNG states, JSON.
    The loop also writes a sub-kilobyte training_meta.json, left out here."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, info = flatten_optimizer(optimizer)
    rng_tensors, rng_info = capture_rng()
    save_training_state(folder, TrainingState(1, 0, 1, 0, 0, 1, optimizer_tensors=tensors, optimizer_json=info,
                                              rng_tensors=rng_tensors, rng_json=rng_info))
    return _dir_bytes(folder)


def svfit_files(svfit_model: SVFitModel, folder: Path, settings: Settings) -> dict[str, int]:
    """Bytes on disk of one SVFit model's adapter (compact and self-contained), training state and PEFT
    LoRA export at the serving rank."""
    optimizer = _optimizer(svfit_model, "svfit", decay_body=False)
    sizes = {"training_state": _save_training_state(folder / "state", optimizer),
             "optimizer_layer0": _state_bytes(optimizer, _in_layer0)}
    save_svfit_adapter(svfit_model, folder / "compact")
    sizes["adapter_compact"] = _dir_bytes(folder / "compact")
    # Without a store the model keeps no basis keys and its adapter carries U, V and s: the same file an
    # injection without a store would write.
    keys, svfit_model.basis_keys = svfit_model.basis_keys, {}
    try:
        save_svfit_adapter(svfit_model, folder / "self_contained")
    finally:
        svfit_model.basis_keys = keys
    sizes["adapter_self_contained"] = _dir_bytes(folder / "self_contained")
    export_peft_lora(svfit_model, folder / "peft_lora", rank=settings.serving_rank)
    sizes["peft_lora"] = _dir_bytes(folder / "peft_lora")
    shutil.rmtree(folder, ignore_errors=True)
    return sizes


def lora_files(peft_model: nn.Module, folder: Path) -> dict[str, int]:
    optimizer = _optimizer(peft_model, "lora", decay_body=True)
    sizes = {"training_state": _save_training_state(folder / "state", optimizer),
             "optimizer_layer0": _state_bytes(optimizer, _in_layer0)}
    peft_model.save_pretrained(folder / "adapter")  # as LoraMethod.save writes it
    sizes["adapter"] = _dir_bytes(folder / "adapter")
    shutil.rmtree(folder, ignore_errors=True)
    return sizes


# ---------------------------------------------------------------------------------------------- arms


def svfit_arm(model: nn.Module, shape: ModelShape, arm: Arm, store: DirectoryBasisStore, settings: Settings,
              folder: Path) -> tuple[dict[str, Any], list[tuple]]:
    files: dict[int, dict[str, int]] = {}
    for layers in ((0,), (0, 1)):
        config = SVFitConfig(rank=arm.rank, target_modules=layer_targets(arm.targets, layers))
        svfit_model = inject_svfit(model, config, bases=store)
        try:
            files[len(layers)] = svfit_files(svfit_model, folder / str(len(layers)), settings)
            if len(layers) == 2:
                first = {n: layer for n, layer in svfit_model.svfit_layers().items() if _in_layer0(n)}
                sigmas = [layer.sigma for layer in first.values()]
                per_layer = {
                    "trainable_params": sum(s.numel() for s in sigmas),
                    "ranks": {n.rsplit(".", 1)[-1]: layer.rank for n, layer in first.items()},
                    "basis_bytes": _nbytes(t for layer in first.values() for t in (layer.U, layer.V, layer.s)),
                    "trainable_bytes": _nbytes(sigmas),
                    "grad_bytes": _nbytes(sigmas),
                }
                dtypes = {k: str(getattr(next(iter(first.values())), k).dtype).removeprefix("torch.")
                          for k in ("U", "V", "s", "sigma")}
                acts = measure_activations(model, shape, settings)
                by_proj = {n.rsplit(".", 1)[-1]: layer for n, layer in first.items()}
                parts = [("svfit", layer.base_layer.weight, layer.U, layer.V) if (layer := by_proj.get(p))
                         else ("frozen", _projection(model.model.layers[0], p).weight) for p in PROJECTIONS]
        finally:
            _unload_svfit(svfit_model)
    per_layer["optimizer_bytes"] = files[2]["optimizer_layer0"]
    fixed = {}
    for name, key, with_state in (("checkpoint_compact_bytes", "adapter_compact", True),
                                  ("checkpoint_self_contained_bytes", "adapter_self_contained", True),
                                  ("artifact_svfit_bytes", "adapter_compact", False),
                                  ("artifact_peft_lora_bytes", "peft_lora", False)):
        one, two = (files[n][key] + (files[n]["training_state"] if with_state else 0) for n in (1, 2))
        per_layer[name], fixed[name] = _split(one, two)
    row = _arm_row(shape, arm, per_layer, fixed, acts)
    row["dtypes"] = dtypes
    return row, parts


def lora_arm(model: nn.Module, shape: ModelShape, arm: Arm, settings: Settings,
             folder: Path) -> tuple[dict[str, Any], list[tuple]]:
    from peft import LoraConfig, get_peft_model

    files: dict[int, dict[str, int]] = {}
    for layers in ((0,), (0, 1)):
        config = LoraConfig(r=arm.rank, lora_alpha=2 * arm.rank, target_modules=layer_targets(arm.targets, layers),
                            lora_dropout=0.0, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        try:
            files[len(layers)] = lora_files(peft_model, folder / str(len(layers)))
            if len(layers) == 2:
                trained = [p for n, p in peft_model.named_parameters() if p.requires_grad and _in_layer0(n)]
                per_layer = {"trainable_params": sum(p.numel() for p in trained), "basis_bytes": 0,
                             "trainable_bytes": _nbytes(trained), "grad_bytes": _nbytes(trained)}
                dtypes = {"lora": str(trained[0].dtype).removeprefix("torch.")}
                acts = measure_activations(model, shape, settings)
                block = model.model.layers[0]
                parts = []
                for p in PROJECTIONS:
                    module = _projection(block, p)
                    if hasattr(module, "lora_A"):
                        # computed in the base's dtype, as bf16 autocast computes peft's fp32 factors
                        a = module.lora_A["default"].weight.detach().to(module.base_layer.weight.dtype)
                        b = module.lora_B["default"].weight.detach().to(module.base_layer.weight.dtype)
                        parts.append(("lora", module.base_layer.weight, a, b, module.scaling["default"]))
                    else:
                        parts.append(("frozen", module.weight))
        finally:
            peft_model.unload()
    per_layer["optimizer_bytes"] = files[2]["optimizer_layer0"]
    fixed = {}
    per_layer["checkpoint_compact_bytes"], fixed["checkpoint_compact_bytes"] = _split(
        *(files[n]["adapter"] + files[n]["training_state"] for n in (1, 2)))
    per_layer["checkpoint_self_contained_bytes"] = per_layer["checkpoint_compact_bytes"]
    fixed["checkpoint_self_contained_bytes"] = fixed["checkpoint_compact_bytes"]
    per_layer["artifact_peft_lora_bytes"], fixed["artifact_peft_lora_bytes"] = _split(
        files[1]["adapter"], files[2]["adapter"])
    row = _arm_row(shape, arm, per_layer, fixed, acts)
    row["dtypes"] = dtypes
    return row, parts


def full_arm(model: nn.Module, shape: ModelShape, arm: Arm, settings: Settings,
             folder: Path) -> tuple[dict[str, Any], list[tuple]]:
    """Full fine-tuning as the library runs it: fp32 weights (trains_base), bf16 autocast, every weight
    trained. Per layer from a real fp32 copy of decoder layer 0 and a real AdamW step; the embeddings and
    lm_head (trained too) by their sizes."""
    block = model.model.layers[0]
    parts = [("full", _projection(block, p).weight) for p in PROJECTIONS]
    layer = copy.deepcopy(block).float()
    named = dict(layer.named_parameters())
    for p in named.values():
        p.requires_grad_(True)
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW([{"params": list(named.values()), "param_names": list(named)}])
    optimizer.step()
    weights = _nbytes(named.values())
    per_layer = {"trainable_params": sum(p.numel() for p in named.values()), "basis_bytes": 0,
                 "trainable_bytes": 0,  # the weights themselves, counted as the base
                 "base_bytes": weights, "grad_bytes": weights,
                 "optimizer_bytes": _state_bytes(optimizer, lambda n: True)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().contiguous() for n, p in named.items()}, folder / "layer.safetensors")
    per_layer["artifact_full_bytes"] = _dir_bytes(folder)
    save_file(flatten_optimizer(optimizer)[0], folder / "optimizer.safetensors")
    per_layer["checkpoint_compact_bytes"] = per_layer["checkpoint_self_contained_bytes"] = _dir_bytes(folder)
    shutil.rmtree(folder, ignore_errors=True)
    del layer, named, optimizer
    outside = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n)
    fixed = {"base_bytes": 4 * outside, "grad_bytes": 4 * outside, "optimizer_bytes": 8 * outside,
             "checkpoint_compact_bytes": 12 * outside, "checkpoint_self_contained_bytes": 12 * outside,
             "artifact_full_bytes": 4 * outside}
    for p in model.parameters():  # bf16 -> fp32 -> bf16 is exact, so the base is unchanged afterwards
        p.data = p.data.float()
        p.requires_grad_(True)
    try:
        acts = measure_activations(model, shape, settings)
    finally:
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
            p.requires_grad_(False)
    row = _arm_row(shape, arm, per_layer, fixed, acts)
    row["dtypes"] = {"weights": "float32", "compute": "bfloat16 (autocast)"}
    row["sources"]["embeddings"] = "their sizes: fp32 weights, gradients and two moments (16 B per parameter)"
    return row, parts


def _arm_row(shape: ModelShape, arm: Arm, per_layer: dict[str, Any], fixed: dict[str, int],
             acts: dict[str, int]) -> dict[str, Any]:
    act_per_layer, act_fixed = {}, {}
    for mode in ("no_ckpt", "ckpt"):
        act_per_layer[mode], act_fixed[mode] = _split(acts[f"{mode}_1"], acts[f"{mode}_2"])
    per_layer["activation_bytes"] = act_per_layer
    fixed["activation_bytes"] = act_fixed
    return {"shape": shape.key, "name": arm.name, "method": arm.method, "targets": arm.targets,
            "target_modules": list(TARGETS[arm.targets]), "rank": arm.rank_label,
            "per_layer": per_layer, "fixed": fixed, "activation_probe_bytes": acts,
            "sources": {"bytes": "tensors and files built by the library (per layer: 2 adapted layers minus 1)",
                        "activations": "measured with 1 and 2 decoder layers"}}


# ------------------------------------------------------------------------------------------ step time


def _mm(a: int, b: int, c: int) -> int:
    """The cost rule's price of an (a, b) @ (b, c) matmul (svfit_core/layer.py)."""
    return max(a * b * c, BALANCE * (a * b + b * c + a * c))


def rule_cost(shape: ModelShape, arm: Arm | None, tokens: int) -> tuple[int, dict[str, str]]:
    """One decoder layer's linears under the cost rule: the frozen floor (forward and input gradient) of all
    seven, plus each arm's extra on its targets. ``arm`` None is the floor alone. LoRA's extra is its six
    skinny matmuls (x Aᵀ, · Bᵀ; G B, Bᵀ's and A's gradients, (G B) A), priced by the same rule."""
    total, plans = 0, {}
    for proj, (m, n) in shape.matrices().items():
        total += 2 * _mm(tokens, n, m)
        if arm is None or proj not in TARGETS[arm.targets]:
            continue
        if arm.method == "svfit":
            r = min(arm.rank or min(m, n), min(m, n))
            plan = choose_plan(tokens, m, n, r, True, True)
            total += plan_cost(plan, tokens, m, n, r, True, True)
            plans[proj] = f"{plan.forward}/{plan.grad_sigma}"
        elif arm.method == "lora":
            r = arm.rank
            total += (_mm(tokens, n, r) + _mm(tokens, r, m) + _mm(tokens, m, r) + _mm(m, tokens, r)
                      + _mm(r, tokens, n) + _mm(tokens, r, n))
        else:
            total += _mm(m, tokens, n)  # the weight gradient Gᵀ X
    return total, plans


def _step_closure(parts: list[tuple], xs: list[torch.Tensor], grads: list[torch.Tensor],
                  device: torch.device) -> Callable[[], None]:
    calls, leaves = [], list(xs)
    for (kind, w, *rest), x in zip(parts, xs, strict=True):
        if kind == "frozen":
            calls.append(functools.partial(F.linear, x, w))
        elif kind == "full":
            wg = w.detach().requires_grad_(True)  # shares the weight's storage; its gradient is new
            leaves.append(wg)
            calls.append(functools.partial(F.linear, x, wg))
        elif kind == "svfit":
            u, v = rest
            delta = torch.zeros(u.shape[1], device=device, dtype=torch.float32, requires_grad=True)  # σ − s
            leaves.append(delta)
            calls.append(functools.partial(svfit_linear, x, delta, w, None, u, v))
        else:  # lora
            a, b, scale = rest
            a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
            leaves += [a, b]
            calls.append(functools.partial(_lora_linear, x, w, a, b, scale))

    def step() -> None:
        outs = [call() for call in calls]
        torch.autograd.backward(outs, grads)
        for leaf in leaves:
            leaf.grad = None

    return step


def _lora_linear(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return F.linear(x, w) + F.linear(F.linear(x, a), b) * scale  # (T, out)


def step_study(shape: ModelShape, parts: dict[str, list[tuple]], settings: Settings) -> dict[str, dict[str, Any]]:
    """Median step of each arm's layer linears, all arms stepped round-robin (round i starts at arm i mod n),
    so load from elsewhere falls on every arm alike."""
    device = torch.device(settings.device)
    gen = torch.Generator(device=device).manual_seed(0)
    t = settings.step_tokens
    mats = shape.matrices()
    xs = [torch.randn(t, n, generator=gen, device=device, dtype=torch.bfloat16).requires_grad_(True)
          for m, n in mats.values()]
    grads = [torch.randn(t, m, generator=gen, device=device, dtype=torch.bfloat16) for m, n in mats.values()]
    steps = {name: _step_closure(p, xs, grads, device) for name, p in parts.items()}
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rnd in range(settings.warmup_rounds + settings.step_rounds):
        for j in range(len(names)):
            name = names[(rnd + j) % len(names)]
            _, secs = _timed(steps[name], device)
            if rnd >= settings.warmup_rounds:
                times[name].append(secs)
    return {name: {"ms_median": 1000 * median(ts), "ms_p25": 1000 * quantile(ts, 0.25),
                   "ms_p75": 1000 * quantile(ts, 0.75), "ms_min": 1000 * min(ts), "steps": len(ts)}
            for name, ts in times.items()}


# ------------------------------------------------------------------------------------ one model shape


def measure_shape(shape: ModelShape, settings: Settings, workdir: Path) -> dict[str, Any]:
    device = torch.device(settings.device)
    log(f"{shape.label}: building {BUILT_LAYERS} decoder layers (real depth {shape.layers})")
    model = build_model(shape, device)
    block = model.model.layers[0]
    weights = {p: _projection(block, p).weight for p in PROJECTIONS}
    outside = [p for n, p in model.named_parameters() if ".layers." not in n]  # tied weights appear once
    info: dict[str, Any] = {
        "shape": shape.key, "label": shape.label, **asdict(shape),
        "built_layers": BUILT_LAYERS,
        "matrices": {p: list(w.shape) for p, w in weights.items()},
        "layer_params": sum(p.numel() for p in block.parameters()),
        "layer_bytes": _nbytes(block.parameters()),
        "outside_params": sum(p.numel() for p in outside),
        "outside_bytes": _nbytes(outside),
    }
    info["model_params"] = info["outside_params"] + shape.layers * info["layer_params"]

    log(f"{shape.label}: SVD study")
    info["svd"] = svd_study(weights, settings)
    if shape.key == SMOLLM2.key and settings.real_weights:
        info["svd_real_weights"] = real_weights_study(settings)
    log(f"{shape.label}: basis store, first and second injection of one decoder layer")
    store = DirectoryBasisStore(workdir / "bases")
    info["basis_reuse"] = basis_reuse(model, store, device)
    fill_smaller_ranks(model, store, [a.rank for a in ARMS if a.method == "svfit" and a.rank])
    log(f"{shape.label}: loss path")
    info["logits_path"] = logits_path(model, shape, settings)

    rows, parts = [], {"floor": [("frozen", w) for w in weights.values()]}
    for arm in ARMS:
        log(f"{shape.label}: {arm.name}")
        if arm.method == "svfit":
            row, parts[arm.name] = svfit_arm(model, shape, arm, store, settings, workdir / arm.name)
        elif arm.method == "lora":
            row, parts[arm.name] = lora_arm(model, shape, arm, settings, workdir / arm.name)
        else:
            row, parts[arm.name] = full_arm(model, shape, arm, settings, workdir / arm.name)
        rows.append(row)
    shutil.rmtree(workdir / "bases", ignore_errors=True)

    log(f"{shape.label}: step time of one decoder layer's linears at T = {settings.step_tokens}")
    steps = step_study(shape, parts, settings)
    info["step_floor"] = steps["floor"]
    for row in rows:
        _add_step(row, shape, steps, settings)
        _add_model(row, shape, info, settings, model)
    info["arms"] = rows
    del model, parts
    return info


def _add_step(row: dict[str, Any], shape: ModelShape, steps: dict[str, dict[str, Any]], settings: Settings) -> None:
    arm = next(a for a in ARMS if a.name == row["name"])
    lora = next(a for a in ARMS if a.method == "lora" and a.targets == arm.targets)
    step = dict(steps[arm.name])
    step["tokens"] = settings.step_tokens
    step["ratio_to_lora"] = step["ms_median"] / steps[lora.name]["ms_median"]
    # Other work on a shared machine only ever adds time: the fastest steps are a second, less noisy view.
    step["ratio_to_lora_min"] = step["ms_min"] / steps[lora.name]["ms_min"]
    step["ratio_to_floor"] = step["ms_median"] / steps["floor"]["ms_median"]
    for label, tokens in (("rule", settings.step_tokens), (f"rule_T{settings.rule_tokens}", settings.rule_tokens)):
        cost, plans = rule_cost(shape, arm, tokens)
        step[f"{label}_ratio_to_lora"] = cost / rule_cost(shape, lora, tokens)[0]
        step[f"{label}_ratio_to_floor"] = cost / rule_cost(shape, None, tokens)[0]
        step[f"{label}_plans"] = plans
    step["vs_rule"] = step["ratio_to_lora"] / step["rule_ratio_to_lora"]
    row["step"] = step


def _add_model(row: dict[str, Any], shape: ModelShape, info: dict[str, Any], settings: Settings,
               model: nn.Module) -> None:
    """Extrapolate to the real depth: fixed + layers × per layer, and the job's peak memory."""
    per, fixed, n = row["per_layer"], row["fixed"], shape.layers
    full = row["method"] == "full"
    parts = {
        "weights": (fixed["base_bytes"] if full else info["outside_bytes"])
        + n * (per["base_bytes"] if full else info["layer_bytes"]),
        "bases": n * per["basis_bytes"],
        "trained": n * per["trainable_bytes"],
        "gradients": fixed.get("grad_bytes", 0) + n * per["grad_bytes"],
        "optimizer": fixed.get("optimizer_bytes", 0) + n * per["optimizer_bytes"],
        "loss_path": info["logits_path"]["chunked_peak_bytes"],
    }
    out: dict[str, Any] = {"layers": n, "micro_batch_tokens": settings.act_tokens,
                           "tokens_per_step": settings.micro_batches * settings.act_tokens}
    for mode in ("ckpt", "no_ckpt"):
        act = fixed["activation_bytes"][mode] + n * per["activation_bytes"][mode]
        out[f"activation_bytes_{mode}"] = act
        out[f"peak_bytes_{mode}"] = sum(parts.values()) + act
        out[f"peak_gib_{mode}"] = out[f"peak_bytes_{mode}"] / GIB
    out["parts_bytes"] = parts
    for key in ("checkpoint_compact_bytes", "checkpoint_self_contained_bytes", "artifact_svfit_bytes",
                "artifact_peft_lora_bytes", "artifact_full_bytes"):
        if key in per:
            out[key] = fixed[key] + n * per[key]
    out["sigma_and_optimizer_bytes"] = parts["trained"] + parts["optimizer"]
    # The training loop's own estimate (memory.py) of the same activations, for comparison.
    width = n * per["trainable_params"] if row["method"] == "svfit" else 0
    model.config.num_hidden_layers = n
    try:
        for mode in ("ckpt", "no_ckpt"):
            out[f"planner_activation_bytes_{mode}"] = settings.act_tokens * activation_bytes_per_token(
                model, compute_bytes=2, adapter_width=width, checkpointing=mode == "ckpt")
    finally:
        model.config.num_hidden_layers = BUILT_LAYERS
    row["model"] = out


# ------------------------------------------------------------------------------------------- targets


def check_targets(shapes: list[dict[str, Any]], arms: list[dict[str, Any]], settings: Settings) -> list[dict]:
    """The issue's targets, on the largest shape measured (Llama-3.1-8B in the full run)."""
    info = max(shapes, key=lambda s: s["model_params"])
    by = {a["name"]: a for a in arms if a["shape"] == info["shape"]}
    label = info["label"]
    cpu = settings.device != "cuda"
    step_note = (f"CPU at T = {settings.step_tokens} tokens: indicative only (the target is for GPU, T = 4,096)"
                 if cpu else None)
    out = []

    def add(key: str, name: str, value: float, limit: float, unit: str, note: str | None = None) -> None:
        out.append({"id": key, "name": name, "value": round(float(value), 4), "limit": round(float(limit), 4),
                    "unit": unit, "met": bool(value <= limit), "shape": info["shape"], "note": note})

    memo = (f"extrapolated to {info['layers']} layers, bf16 base, checkpointing, "
            f"{settings.micro_batches} x {settings.act_tokens:,} tokens per step")
    for name, limit, what in (("svfit_rk_all", 40, "all-linear SVFit r=k"),
                              ("svfit_r256_all", 24, "all-linear SVFit r=256"),
                              ("svfit_rk_qv", 24, "q,v SVFit r=k")):
        add(f"peak_{name}", f"{label} {what}: peak training memory <= {limit} GiB",
            by[name]["model"]["peak_gib_ckpt"], limit, "GiB", memo)
    for a in ARMS:
        if a.method != "svfit":
            continue
        model = by[a.name]["model"]
        add(f"checkpoint_{a.name}", f"{label} {a.name}: compact checkpoint <= 2 x (sigma + AdamW) + 1 MB",
            model["checkpoint_compact_bytes"] / MB, (2 * model["sigma_and_optimizer_bytes"] + MB) / MB, "MB",
            f"extrapolated to {info['layers']} layers")
    reuse = info["basis_reuse"]
    add("basis_reuse", f"{label}: second job's basis time <= 10 % of the first (one decoder layer)",
        reuse["ratio"], 0.10, "ratio", f"first {reuse['first_s']:.1f} s, second {reuse['second_s']:.2f} s")
    for name, limit in (("svfit_r64_all", 1.1), ("svfit_r256_all", 1.2), ("svfit_rk_all", 2.6)):
        add(f"step_{name}", f"{label} {name}: layer step <= {limit} x LoRA r=16's"
            + (f" (CPU, T={settings.step_tokens}, indicative)" if cpu else ""),
            by[name]["step"]["ratio_to_lora"], limit, "x LoRA r=16", step_note)
    for name in ("svfit_r64_all", "svfit_r256_all", "svfit_rk_all"):
        step = by[name]["step"]
        # The rule prices SVFit; LoRA's price is this benchmark's (six skinny matmuls), so the floor view is
        # the rule's own check.
        add(f"rule_{name}", f"{label} {name}: measured step ratio within 10 % of the cost rule's (same T)",
            abs(step["vs_rule"] - 1), 0.10, "relative deviation",
            f"x LoRA r=16: measured {step['ratio_to_lora']:.2f}, rule {step['rule_ratio_to_lora']:.2f}; x frozen "
            f"floor: measured {step['ratio_to_floor']:.2f}, rule {step['rule_ratio_to_floor']:.2f}; "
            f"T = {settings.step_tokens}" + ("; CPU: indicative" if cpu else ""))
    return out


# ------------------------------------------------------------------------------------------- the run


def run(shapes: list[ModelShape], settings: Settings, workdir: str | Path | None = None) -> dict[str, Any]:
    """Measure every shape and arm; the payload of the result file (without the machine header)."""
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="svfit-scale-") if own else workdir)
    try:
        infos = []
        for shape in shapes:
            infos.append(measure_shape(shape, settings, root / shape.key))
            gc.collect()
            if settings.device == "cuda":
                torch.cuda.empty_cache()
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    arms = [row for info in infos for row in info.pop("arms")]
    return {
        "settings": asdict(settings) | {
            "lora": {"r": LORA_RANK, "alpha": 2 * LORA_RANK, "dropout": 0.0},
            "built_layers": BUILT_LAYERS,
            "weights": f"random, bf16; decoder layers 1..{BUILT_LAYERS - 1} hold copies of layer 0's weights",
            "memory_probe": "torch.cuda.max_memory_allocated" if settings.device == "cuda"
            else "LiveTensorBytes (tensor storages created by ops, until freed)",
            "peak_formula": "weights + bases + trained tensors + gradients + AdamW moments "
                            "+ activation peak of one micro-batch + chunked loss-path peak",
            "step": "one decoder layer's 7 linears, forward + backward, bf16, non-targets frozen",
        },
        "shapes": infos,
        "arms": arms,
        "targets": check_targets(infos, arms, settings),
    }


def _mb(x: float | None) -> float | None:
    return None if x is None else x / MB


def print_tables(payload: dict[str, Any]) -> None:
    settings = payload["settings"]
    for info in payload["shapes"]:
        rows = [a for a in payload["arms"] if a["shape"] == info["shape"]]
        print(f"\n{info['label']} (hidden {info['hidden']}, {info['layers']} layers; base layer "
              f"{info['layer_bytes'] / MB:,.0f} MB bf16, embeddings/head {info['outside_bytes'] / MB:,.0f} MB)")
        print(f"per decoder layer (MB; activations at {settings['act_tokens']:,} tokens; LoRA file: SVFit's "
              f"export at r'={settings['serving_rank']}, LoRA's own adapter)")
        print(format_table(
            ["arm", "trained", "bases", "trained+grad+AdamW", "ckpt compact", "ckpt self-cont.", "artifact",
             "LoRA file", "act", "act ckpt"],
            [[r["name"], r["per_layer"]["trainable_params"], _mb(r["per_layer"]["basis_bytes"]),
              _mb(r["per_layer"]["trainable_bytes"] + r["per_layer"]["grad_bytes"] + r["per_layer"]["optimizer_bytes"]),
              _mb(r["per_layer"]["checkpoint_compact_bytes"]), _mb(r["per_layer"]["checkpoint_self_contained_bytes"]),
              _mb(r["per_layer"].get("artifact_svfit_bytes", r["per_layer"].get("artifact_full_bytes"))),
              _mb(r["per_layer"].get("artifact_peft_lora_bytes")),
              _mb(r["per_layer"]["activation_bytes"]["no_ckpt"]), _mb(r["per_layer"]["activation_bytes"]["ckpt"])]
             for r in rows]))
        t = settings["step_tokens"]
        print(f"\nstep of one layer's linears at T = {t:,} (floor {info['step_floor']['ms_median']:.1f} ms) and "
              f"the whole model at {info['layers']} layers")
        print(format_table(
            ["arm", "step ms", "x LoRA16", "(min)", f"rule x LoRA16 (T={t})", f"rule (T={settings['rule_tokens']})",
             "x floor", "peak GiB ckpt", "peak GiB no ckpt", "ckpt MB", "act GiB ckpt", "planner act GiB"],
            [[r["name"], r["step"]["ms_median"], r["step"]["ratio_to_lora"], r["step"]["ratio_to_lora_min"],
              r["step"]["rule_ratio_to_lora"],
              r["step"][f"rule_T{settings['rule_tokens']}_ratio_to_lora"], r["step"]["ratio_to_floor"],
              r["model"]["peak_gib_ckpt"], r["model"]["peak_gib_no_ckpt"], _mb(r["model"]["checkpoint_compact_bytes"]),
              r["model"]["activation_bytes_ckpt"] / GIB, r["model"]["planner_activation_bytes_ckpt"] / GIB]
             for r in rows]))
        print("\nSVD per distinct matrix shape (seconds; agreement with the full SVD on the top r)")
        print(_svd_table(info["svd"]))
        real = info.get("svd_real_weights")
        if real and "rows" in real:
            print(f"\n  the same on {real['weights']}")
            print(_svd_table(real["rows"]))
        reuse, logits = info["basis_reuse"], info["logits_path"]
        print(f"\nbasis store: first injection of one layer {reuse['first_s']:.2f} s, second {reuse['second_s']:.3f} s "
              f"({100 * reuse['ratio']:.1f} %); store holds {reuse['store_bytes_per_layer'] / MB:,.0f} MB per layer "
              f"({reuse['store_dtypes']})")
        print(f"loss path at {logits['tokens']:,} tokens: full fp32 logits peak "
              f"{logits['full_logits_peak_bytes'] / MB:,.0f} MB, chunked {logits['chunked_peak_bytes'] / MB:,.0f} MB "
              f"(fp32 logits alone {logits['fp32_logits_bytes'] / MB:,.0f} MB)")
    print("\nTargets")
    print(format_table(["target", "measured", "limit", "unit", "met"],
                       [[t["name"], t["value"], t["limit"], t["unit"], "yes" if t["met"] else "NO"]
                        for t in payload["targets"]]))


def _svd_table(rows: list[dict[str, Any]]) -> str:
    def fast(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return "-"
        return (f"{entry['seconds']:.2f} s, s err {entry['s_rel_err_max']:.1e}, "
                f"overlap {min(entry['overlap_u'], entry['overlap_v']):.3f}")

    lines = []
    for row in rows:
        agree = {a["r"]: a for a in row["gram_eigh"]["agreement"]}
        top = agree[min(agree)]
        lines.append([f"{row['shape'][0]}x{row['shape'][1]}", row["full_svd_s"], fast(row.get("lowrank_r64")),
                      fast(row.get("lowrank_r256")),
                      f"{row['gram_eigh']['seconds']:.2f} s, r={top['r']}: s err {top['s_rel_err_max']:.1e}, "
                      f"overlap {min(top['overlap_u'], top['overlap_v']):.4f}"])
    return format_table(["matrix", "full svd s", "lowrank r=64", "lowrank r=256", "gram eigh"], lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    ap.add_argument("--quick", action="store_true", help="SmolLM2 and 1B shapes, small T (a smoke run)")
    ap.add_argument("--name", default=None, help="result file name (default scale / scale_quick)")
    ap.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    ap.add_argument("--step-tokens", type=int, default=None, help="T of the step timing (default 4,096 on "
                    "CUDA, 512 on the CPU)")
    ap.add_argument("--step-rounds", type=int, default=None, help="timed round-robin rounds (default 20)")
    args = ap.parse_args(argv)

    started = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    torch.set_num_threads(args.threads)
    settings = Settings.for_run(device, args.quick)
    if args.step_tokens:
        settings = replace(settings, step_tokens=args.step_tokens)
    if args.step_rounds:
        settings = replace(settings, step_rounds=args.step_rounds)
    default = [SMOLLM2, LLAMA32_1B] if args.quick else [SMOLLM2, LLAMA32_1B, LLAMA31_8B]
    shapes = [SHAPES[k] for k in args.shapes.split(",")] if args.shapes else default
    payload = run(shapes, settings)
    print_tables(payload)
    path = write_result(args.name or ("scale_quick" if args.quick else "scale"), payload, started)
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
