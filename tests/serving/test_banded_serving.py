"""A banded SVFit adapter (``band`` > 0) in the engine: the shared-base lane refuses it (its Δ couples
directions, so it is no per-row Δσ), and the engine serves it on a model of its own with the trained model's
log probabilities."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serving.engine import InferenceEngine
from serving.lanes import ModelLane
from serving.types import GenerationRequest, ModelRef, SamplingParams
from svfit_core import SVFitConfig, inject_svfit, save_svfit_adapter
from svfit_core.errors import ConfigError
from svfit_core.loading import load_tokenizer
from svfit_core.multi_adapter import MultiAdapterModel
from testkit.tiny_models import load_tiny
from tests.serving.conftest import LLAMA, make_settings, training_meta, write_meta

PROMPT = "what is good ?"
STEPS, TOP = 6, 3


def banded_model(base_dir, seed: int = 7):
    """A banded SVFitModel whose σ and off-diagonals moved by seeded noise, both as large as the σ steps."""
    svfit = inject_svfit(load_tiny(base_dir, "causal"), SVFitConfig(rank=8, band=2, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in svfit.svfit_layers().values():
            size = 0.5 * layer.s.abs().mean()
            layer.sigma.add_(size * torch.randn(layer.sigma.shape, generator=g))
            layer.band_weights.add_(size * torch.randn(layer.band_weights.shape, generator=g))
    return svfit.eval()


@pytest.fixture(scope="module")
def banded(zoo, tmp_path_factory):
    """(adapter folder as training writes it, the trained model it came from)."""
    model = banded_model(zoo.llama)
    folder = tmp_path_factory.mktemp("banded") / "adapter"
    save_svfit_adapter(model, folder)
    return write_meta(folder, training_meta("svfit")), model


@torch.no_grad()
def trained_logprobs(model, tokenizer, prompt: str, steps: int) -> list[torch.Tensor]:
    """The trained (unmerged) model's next-token log-softmax at each greedy step, without a cache."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = []
    for _ in range(steps):
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
        out.append(logp)
        ids = torch.cat([ids, logp.argmax().view(1, 1)], 1)
    return out


def test_the_shared_base_lane_refuses_a_banded_adapter(zoo, banded):
    multi = MultiAdapterModel(load_tiny(zoo.llama, "causal"))
    with pytest.raises(ConfigError) as info:
        multi.add_adapter("banded", banded[0])
    assert info.value.code == "not_shareable" and "band" in str(info.value)
    assert not multi.adapters


def test_a_banded_adapter_is_served_alone_with_the_trained_logprobs(zoo, banded, tmp_path):
    folder, model = banded
    tokenizer = load_tokenizer(zoo.llama)
    expected = trained_logprobs(model, tokenizer, PROMPT, STEPS)
    # The off-diagonals matter to these numbers: the same σ without them gives other log probabilities.
    with torch.no_grad():
        saved = {n: layer.band_weights.clone() for n, layer in model.svfit_layers().items()}
        for layer in model.svfit_layers().values():
            layer.band_weights.zero_()
        sigma_only = trained_logprobs(model, tokenizer, PROMPT, 1)[0]
        for n, layer in model.svfit_layers().items():
            layer.band_weights.copy_(saved[n])
    assert (sigma_only - expected[0]).abs().max() > 1e-2

    ref = ModelRef(model_id="banded", base_id=LLAMA, base_path=zoo.llama, adapter_dir=folder, method="svfit")
    request = GenerationRequest(ref=ref, prompts=(PROMPT,),
                                sampling=SamplingParams(max_tokens=STEPS, temperature=0.0, logprobs=TOP,
                                                        ignore_eos=True))
    engine = InferenceEngine(make_settings(tmp_path, zoo))

    async def run():
        ticket = await engine.generate(request)
        return (await ticket.collect())[0]

    try:
        [got] = asyncio.run(run())
        lanes = list(engine.scheduler.cache.lanes.values())
    finally:
        engine.stop()
    assert [type(lane) for lane in lanes] == [ModelLane] and lanes[0].key[0] == "model"
    assert len(got.logprobs) == STEPS
    for step, (entry, logp) in enumerate(zip(got.logprobs, expected)):
        best = logp.topk(TOP)
        assert [alt.token for alt in entry.top] == [tokenizer.decode([int(i)]) for i in best.indices], step
        assert [alt.logprob for alt in entry.top] == pytest.approx(best.values.tolist(), abs=1e-5), step
