"""The SVFit core on a CUDA device: init identity in fp32 and under bf16 autocast, gradients that match the
CPU's, the training loop end to end with its CUDA defaults (a bf16 base, fp32 σ), and a base held in bf16
on the device with no fp32 copy of it.

These need a GPU and are skipped where none is visible (CI has none); run them on a GPU host with
``python -m pytest tests/gpu``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from svfit_core import SVFitConfig, inject_svfit
from svfit_core.loading import base_dtype_for, load_base_model
from svfit_core.training.outputs import load_trained_model
from svfit_core.layer import svfit_linear
from svfit_core.training import PeftSpec, TrainConfig, TrainingCallbacks, run_training
from tests.svfit_core.test_training import CHAT
from testkit.tiny_models import MAX_POSITIONS, VOCAB, VOCAB_SIZE, build_tiny, build_tokenizer, load_tiny, sample_batch

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


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):
    """An fp32 Llama checkpoint of ~100M parameters: wide enough that a copy of its weights in fp32 would
    stand far above the allocator's noise (SVD workspaces, activations of a short batch)."""
    config = LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=MAX_POSITIONS, vocab_size=VOCAB_SIZE,
        pad_token_id=VOCAB["<pad>"], bos_token_id=VOCAB["<s>"], eos_token_id=VOCAB["</s>"],
    )
    out = tmp_path_factory.mktemp("gpu-wide-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    build_tokenizer("llama").save_pretrained(str(out))
    return out


def test_the_base_stays_bf16_on_the_device_without_fp32_copies(wide_llama_dir, tmp_path):
    device = torch.device("cuda")
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16: the rule keeps an fp32 base there")
    dtype = base_dtype_for(wide_llama_dir, "auto", device)
    assert dtype == torch.bfloat16  # an fp32 checkpoint on a bf16 GPU

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model, _ = load_base_model(wide_llama_dir, "causal", dtype=dtype, device=device)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in model.parameters())
    svfit_model = inject_svfit(model, SVFitConfig(rank=64))
    for name, p in svfit_model.named_parameters():
        assert p.is_cuda and p.dtype == (torch.float32 if name.endswith(".sigma") else torch.bfloat16), name
    for layer in svfit_model.svfit_layers().values():
        assert layer.U.is_cuda and layer.U.dtype == layer.V.dtype == torch.bfloat16  # (out, 64), (in, 64)

    optimizer = torch.optim.AdamW(svfit_model.svfit_parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(2):
        batch = {k: v.cuda() for k, v in sample_batch(batch=4, seq=32, seed=step).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = svfit_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(t.dtype == torch.float32 for state in optimizer.state.values() for t in state.values() if t.dim())
    # Loading, the SVDs and two steps together: an fp32 copy of the frozen weights alone would be 2× this.
    peak = torch.cuda.max_memory_allocated() - start
    assert peak < 1.5 * base_bytes, (peak, base_bytes)
    del svfit_model, model, optimizer

    # The loop does the same by default on a GPU.
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    infos = []

    class Keep(TrainingCallbacks):
        def on_start(self, info):
            infos.append(info)

    config = TrainConfig(max_steps=2, batch_size=4, seed=0, device="cuda")
    result = run_training(wide_llama_dir, CHAT, None, PeftSpec(rank=64), config, tmp_path, Keep())
    assert result.ended_by == "completion"
    assert infos[0]["config"]["base_dtype"] == "bfloat16" and infos[0]["config"]["bf16"] is True
    peak = torch.cuda.max_memory_allocated() - start
    assert peak < 1.5 * base_bytes, (peak, base_bytes)
