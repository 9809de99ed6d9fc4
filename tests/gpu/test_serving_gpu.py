"""The inference engine on a CUDA device in bf16: greedy answers equal transformers' ``generate`` on the same
device and dtype, and SVFit adapters batched with the base model answer as each does served alone.

bf16 rounds logits by about 1e-3 here, so two runs that batch differently may pick different tokens where two
candidates are that close. The comparisons are token by token with each token's log probability; at a step
where the tokens differ, the reference's two candidates must be within ``TIE`` of each other (a bf16 tie), and
the steps after it are not compared (the runs continue from different text).

The GPU tests need a CUDA device and are skipped where none is visible (CI has none); run them on a GPU host
with ``python -m pytest tests/gpu``. A GPU host with torch alone has no pydantic-settings, which
``api.core.settings`` needs: benchmarks/engine_settings.py then stands in for it (the last test, which runs
anywhere pydantic-settings is installed, checks that the stand-in keeps the real settings' defaults).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks.engine_settings import engine_settings, pydantic_settings_installed, standin_fields, use_engine_settings

use_engine_settings()  # before serving/ is imported

from serving.engine import InferenceEngine  # noqa: E402
from serving.lanes import SharedBaseLane  # noqa: E402
from serving.logprobs import TokenNames  # noqa: E402
from serving.types import GenerationRequest, ModelRef, SamplingParams  # noqa: E402
from svfit_core import SVFitConfig, inject_svfit, save_svfit_adapter  # noqa: E402
from svfit_core.loading import load_base_model  # noqa: E402
from testkit.tiny_models import build_tiny, load_tiny  # noqa: E402

DEVICE = "cuda"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["the movie was", "i love this", "what is good ?", "hello world"]
MAX_TOKENS = 8
TOP = 4  # alternatives recorded per step
TIE = 0.02  # log-probability gap within which bf16 rounding may pick either token
LOGPROB_ATOL = 0.02  # the same token's log probability in two runs
BASE = "tiny-llama"


@dataclass
class Step:
    token: str
    logprob: float
    top: dict[str, float]  # the TOP most likely tokens at this step and their log probabilities


def assert_same_greedy(got: list[Step], want: list[Step], what: str) -> int:
    """``got`` decodes as ``want`` up to bf16 ties (module docstring); returns how many steps were compared."""
    assert len(got) == len(want) == MAX_TOKENS, what
    for i, (g, w) in enumerate(zip(got, want)):
        assert math.isfinite(g.logprob) and math.isfinite(w.logprob), f"{what}, step {i}: not finite"
        if g.token != w.token:
            gap = w.logprob - w.top.get(g.token, -math.inf)
            assert gap <= TIE, f"{what}, step {i}: {g.token!r} where {w.token!r} leads by {gap:.4f} (not a tie)"
            return i
        assert abs(g.logprob - w.logprob) <= LOGPROB_ATOL, f"{what}, step {i}: {g.logprob} vs {w.logprob}"
    return len(got)


def engine_steps(choice) -> list[Step]:
    return [Step(lp.token, lp.logprob, {t.token: t.logprob for t in lp.top}) for lp in choice.logprobs]


# ------------------------------------------------------------------------------------------------- fixtures


def perturbed_svfit(base_dir: Path, out: Path, seed: int) -> Path:
    """An SVFit adapter (rank 8, every linear layer) whose σ moved by seeded noise, saved as training saves it."""
    svfit = inject_svfit(load_tiny(base_dir, "causal"), SVFitConfig(rank=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in svfit.svfit_layers().values():
            layer.sigma.mul_(1 + 0.5 * torch.randn(layer.sigma.shape, generator=g))
    save_svfit_adapter(svfit, out)
    (out / "training_meta.json").write_text(json.dumps({"format_version": 1, "method": "svfit", "task": "causal",
                                                         "label_names": None, "step": 10}))
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str | None, ModelRef]:
    root = tmp_path_factory.mktemp("gpu-serving")
    base = build_tiny("llama", "causal", root / "base")
    refs: dict[str | None, ModelRef] = {None: ModelRef(model_id=BASE, base_id=BASE, base_path=base)}
    for i in range(3):
        folder = perturbed_svfit(base, root / f"sv{i}", seed=i)
        refs[f"sv{i}"] = ModelRef(model_id=f"sv{i}", base_id=BASE, base_path=base, adapter_dir=folder, method="svfit")
    return refs


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    settings = engine_settings(tmp_path_factory.mktemp("gpu-engine"), inference_device=DEVICE,
                               inference_dtype="bfloat16", inference_batch_window_ms=50)
    engine = InferenceEngine(settings)
    yield engine
    engine.stop()


def greedy(ref: ModelRef, prompt: str) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=TOP)
    return GenerationRequest(ref=ref, sampling=sampling, prompts=(prompt,))


async def _answers(engine: InferenceEngine, requests: list[GenerationRequest]) -> list[list[Step]]:
    async def one(request):
        ticket = await engine.generate(request)
        choices, _ = await ticket.collect()
        return engine_steps(choices[0])

    return list(await asyncio.gather(*(one(r) for r in requests)))


def together(engine, requests) -> list[list[Step]]:
    """All requests at once: the engine batches them."""
    return asyncio.run(_answers(engine, requests))


def alone(engine, requests) -> list[list[Step]]:
    """Each request by itself (a batch of one)."""
    return [asyncio.run(_answers(engine, [r]))[0] for r in requests]


@torch.no_grad()
def hf_greedy(base: Path, prompt: str) -> list[Step]:
    """transformers' own greedy ``generate`` of the base model on the GPU in bf16, past EOS like ignore_eos."""
    model, tokenizer = load_base_model(base, "causal", dtype=torch.bfloat16, device=torch.device(DEVICE))
    model.eval().generation_config.eos_token_id = None  # no stopping at EOS; the logits are untouched
    encoded = tokenizer(prompt, return_tensors="pt").to(DEVICE)
    out = model.generate(**encoded, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, encoded["input_ids"].shape[1]:].tolist()
    names = TokenNames(tokenizer)
    steps = []
    for token, logits in zip(new, out.logits):
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        values, ids = logp.topk(TOP)
        steps.append(Step(names(token)[0], logp[token].item(),
                          {names(i)[0]: v for v, i in zip(values.tolist(), ids.tolist())}))
    return steps


# ---------------------------------------------------------------------------------------------------- tests


@needs_cuda
def test_engine_greedy_equals_generate_on_cuda_bf16(zoo, engine):
    base = zoo[None]
    got = together(engine, [greedy(base, p) for p in PROMPTS])
    compared = [assert_same_greedy(g, hf_greedy(base.base_path, p), f"prompt {p!r}") for g, p in zip(got, PROMPTS)]
    assert sum(compared) >= len(PROMPTS) * MAX_TOKENS // 2  # ties are rare: most steps were compared


@needs_cuda
def test_svfit_adapters_batched_with_the_base_answer_as_alone_on_cuda(zoo, engine, monkeypatch):
    seen: list[set] = []
    forward = SharedBaseLane.forward

    def spy(self, tags, **inputs):
        seen.append(set(tags))
        return forward(self, tags, **inputs)

    monkeypatch.setattr(SharedBaseLane, "forward", spy)
    names = [None, "sv0", "sv1", "sv2", "sv0"]
    requests = [greedy(zoo[n], PROMPTS[i % len(PROMPTS)]) for i, n in enumerate(names)]
    batched = together(engine, requests)
    assert max(len(tags) for tags in seen) == 4  # the base and three adapters in one forward
    single = alone(engine, requests)
    compared = [assert_same_greedy(batched[i], single[i], f"{name or 'base'}, row {i}") for i, name in enumerate(names)]
    assert sum(compared) >= len(names) * MAX_TOKENS // 2  # ties are rare: most steps were compared
    # adapters change the answers: otherwise this could not tell batching them from ignoring them
    same_prompt = alone(engine, [greedy(zoo[n], PROMPTS[0]) for n in (None, "sv0", "sv1")])
    assert len({tuple(s.token for s in steps) for steps in same_prompt}) >= 2


@pytest.mark.skipif(not pydantic_settings_installed(), reason="needs pydantic-settings (the real settings)")
def test_standin_settings_match_the_real_ones():
    """The stand-in (benchmarks/engine_settings.py) has every settings field serving/ reads, same defaults."""
    from api.core.settings import Settings

    real = Settings.model_fields
    standin = standin_fields()
    for name, default in standin.items():
        assert name in real, name
        assert real[name].default == default, (name, real[name].default, default)
    serving = Path(__file__).resolve().parents[2] / "serving"
    read = {m for path in serving.glob("*.py") for m in re.findall(r"\b(inference_\w+)", path.read_text())}
    assert read & set(real) <= set(standin), sorted((read & set(real)) - set(standin))
