"""The SVFit core on a CUDA device: init identity in fp32 and under bf16 autocast, gradients that match the
CPU's, and the training loop end to end with its CUDA defaults (bf16 autocast, fp32 σ).

These need a GPU and are skipped where none is visible (CI has none); run them on a GPU host with
``python -m pytest tests/gpu``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from svfit_core import SVFitConfig, inject_svfit
from svfit_core.training.outputs import load_trained_model
from svfit_core.layer import svfit_linear
from svfit_core.training import PeftSpec, TrainConfig, TrainingCallbacks, run_training
from tests.svfit_core.test_training import CHAT
from testkit.tiny_models import build_tiny, load_tiny, sample_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FORMULATIONS = ("skinny", "dense", "dense_skinny")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny("llama", "causal", tmp_path_factory.mktemp("gpu-llama"))


def _cuda_batch():
    return {k: v.cuda() for k, v in sample_batch(batch=2, seq=8, seed=0).items()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_identity_at_init_on_cuda(llama_dir, autocast):
    base = load_tiny(llama_dir, "causal").cuda().eval()
    adapted = inject_svfit(copy.deepcopy(base), SVFitConfig(target_modules="all-linear")).eval()
    batch = _cuda_batch()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        expected, got = base(**batch).logits, adapted(**batch).logits
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_gradients_match_cpu(formulation):
    g = torch.Generator().manual_seed(0)
    m, n, r, tokens = 96, 64, 48, 300
    w = torch.randn(m, n, generator=g)
    bias = torch.randn(m, generator=g)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    x = torch.randn(tokens, n, generator=g)
    delta = 0.1 * torch.randn(r, generator=g)
    grad_out = torch.randn(tokens, m, generator=g)

    def grads(device):
        xd = x.to(device).requires_grad_(True)
        dd = delta.to(device).requires_grad_(True)
        out = svfit_linear(xd, dd, w.to(device), bias.to(device), u.to(device), v.to(device),
                           formulation=formulation)
        out.backward(grad_out.to(device))
        return out.detach().cpu(), xd.grad.cpu(), dd.grad.cpu()

    # TF32 would make the CUDA side differ by ~1e-3; the comparison is of the formulas, in full fp32.
    torch.backends.cuda.matmul.allow_tf32 = False
    for got, want in zip(grads("cuda"), grads("cpu")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_training_on_cuda_uses_bf16_and_keeps_sigma_fp32(llama_dir, tmp_path):
    config = TrainConfig(n_epochs=3, batch_size=4, seed=0, learning_rate=5e-2, device="cuda")
    steps = []

    class Keep(TrainingCallbacks):
        def on_start(self, info):
            steps.append(("start", info))

        def on_step(self, metrics):
            steps.append(("step", metrics))

    result = run_training(llama_dir, CHAT, CHAT[:4], PeftSpec(), config, tmp_path, Keep())
    assert result.ended_by == "completion"
    info = steps[0][1]
    assert info["config"]["bf16"] is True
    losses = [m["train_loss"] for kind, m in steps if kind == "step"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    # The adapter written on the GPU loads on the CPU and differs from the base there.
    model, _, _ = load_trained_model(llama_dir, result.adapter_dir)
    sigmas = [p for n, p in model.named_parameters() if n.endswith("sigma")]
    assert sigmas and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in sigmas)
    assert any(not torch.equal(layer.sigma, layer.s) for layer in model.modules() if hasattr(layer, "sigma"))
