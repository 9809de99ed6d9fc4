"""DPO and reinforcement on a CUDA device with the loop's CUDA defaults (a bf16 base under autocast, fp32 σ and
adapters): the references, the sampling (per-row generators on the device) and the KL term all run there.

Skipped where no GPU is visible (CI has none); run on a GPU host with ``python -m pytest tests/gpu``.
"""

from __future__ import annotations

import pytest
import torch

from svfit_core.training import PeftSpec, TrainConfig
from tests.svfit_core.test_preference import PREFERENCES
from tests.svfit_core.test_reinforcement import PROMPTS, share_of_target_words
from tests.svfit_core.test_training import Recorder
from testkit.tiny_models import build_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SPECS = {"svfit": PeftSpec(rank=16, target_modules=["q_proj", "v_proj"]),
         "lora": PeftSpec(method="lora", rank=4, target_modules=["q_proj", "v_proj"]),
         "full": PeftSpec(method="full")}
RATES = {"svfit": 0.5, "lora": 3e-2, "full": 3e-2}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny("llama", "causal", tmp_path_factory.mktemp("gpu-llama"))


@pytest.mark.parametrize("method", list(SPECS))
def test_reinforcement_runs_on_cuda_from_its_reference(method, llama_dir, tmp_path):
    from svfit_core.training import run_training

    recorder = Recorder()
    config = TrainConfig(n_epochs=2, batch_size=4, learning_rate=RATES[method], samples_per_prompt=4,
                         max_completion_tokens=6, max_seq_length=48, eval_every=2, device="cuda")
    result = run_training(llama_dir, PROMPTS, PROMPTS[:4], SPECS[method], config, tmp_path, recorder,
                          reward=share_of_target_words)
    assert result.ended_by == "completion" and recorder.info["device"].startswith("cuda")
    # bf16 rounding: the starting policy is its reference up to the precision it computes in.
    assert recorder.steps[0]["train_kl"] < 1e-2
    assert all(0 <= e["valid_reward"] <= 1 for e in recorder.evals)


@pytest.mark.parametrize("method", list(SPECS))
def test_dpo_runs_on_cuda_and_starts_at_log_2(method, llama_dir, tmp_path):
    from svfit_core.training import run_training

    recorder = Recorder()
    config = TrainConfig(n_epochs=1, batch_size=4, learning_rate=RATES[method], device="cuda")
    result = run_training(llama_dir, PREFERENCES, None, SPECS[method], config, tmp_path, recorder)
    assert result.ended_by == "completion"
    assert recorder.steps[0]["train_loss"] == pytest.approx(0.6931, abs=0.02)
