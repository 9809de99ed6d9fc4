"""The pre-flight memory checks: the estimate's parts are the tensors a run builds, a job that cannot fit the
device fails before loading with what would fit (CUDA memory mocked: CI has no GPU), a host too small for
the load fails before loading too, and a base whose shape cannot be read is let through."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from svfit_core.errors import DeviceMemoryError, HostMemoryError
from svfit_core.loading import read_model_config
from svfit_core.training import PeftSpec, TrainConfig, loop, memory, preflight, run_training
from svfit_core.training.loss import causal_loss
from svfit_core.training.run_config import DEFAULT_SVFIT_RANK
from svfit_core.training.setup_resources import NO_RESOURCES
from tests.svfit_core.test_training import Recorder

CHATS = [
    {"messages": [{"role": "user", "content": "what is the movie"}, {"role": "assistant", "content": f"it is {w}"}]}
    for w in ("good", "bad", "great", "terrible")
]
# Llama-3.1-8B's shape (a config.json as it ships, less the RoPE scaling, which changes no tensor).
LLAMA_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
}
FREE_24_GB = 24 * 10**9


class Loaded(Exception):
    """Raised in place of loading the base: the pre-flight let the job through."""


@pytest.fixture
def no_loading(monkeypatch):
    def load(*args, **kwargs):  # noqa: ANN002, ANN003
        raise Loaded

    monkeypatch.setattr(loop, "load_base_model", load)


@pytest.fixture
def cuda_with_24_gb(monkeypatch):
    """A bf16-capable CUDA device with 24 GB free, as far as the pre-flight and the dtype rule can tell."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (FREE_24_GB, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.fixture
def llama_8b(tmp_path):
    (tmp_path / "llama-8b").mkdir()
    (tmp_path / "llama-8b" / "config.json").write_text(json.dumps(LLAMA_8B))
    return tmp_path / "llama-8b"


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- the estimate is the tensors built ------------------------------------------------------------------------


@pytest.mark.parametrize("arch, task, base_dtype, peft", [
    ("llama", "causal", "float32", PeftSpec(target_modules="all-linear")),
    ("llama", "causal", "bfloat16", PeftSpec(rank=4)),
    ("llama", "classification", "bfloat16", PeftSpec(target_modules="all-linear", energy=0.9)),
    ("gpt2", "causal", "bfloat16", PeftSpec(target_modules="all-linear", rank=16)),  # Conv1D: (in, out) weights
    ("bert", "classification", "float32", PeftSpec()),
])
def test_estimate_parts_are_the_tensors_the_run_builds(tiny_case_factory, tmp_path, arch, task, base_dtype, peft):
    path = tiny_case_factory(arch, task).path
    labels = ["0", "1"] if task == "classification" else None
    run = loop._setup_model(path, tmp_path, task, labels, peft, TrainConfig(base_dtype=base_dtype, device="cpu"),
                            None, "supervised", NO_RESOURCES)
    estimate = memory.estimate_memory(json.loads((path / "config.json").read_text()), peft, run.config, task=task,
                                      num_labels=len(labels) if labels else None)

    params = dict(run.model.named_parameters())
    sigma = [p for name, p in params.items() if name.endswith(".sigma")]
    bases = [b for name, b in run.model.named_buffers() if name.rsplit(".", 1)[-1] in ("U", "V", "s")]
    trained = [p for p in params.values() if p.requires_grad]
    assert estimate["base"] == _tensor_bytes(p for name, p in params.items() if not name.endswith(".sigma"))
    # Under the energy rule the estimate takes r = k: the tiny random weights keep most of their spectrum.
    assert estimate["bases"] >= _tensor_bytes(bases) > 0
    if peft.energy is None:
        assert estimate["bases"] == _tensor_bytes(bases)
        assert estimate["trainable"] == _tensor_bytes(sigma)
        assert estimate["gradients"] == _tensor_bytes(trained)
        assert estimate["optimizer"] == 2 * _tensor_bytes(trained)
    assert estimate["total"] == sum(v for k, v in estimate.items() if k != "total")


def test_estimated_activations_hold_what_backward_keeps(tiny_case_factory, tmp_path):
    path = tiny_case_factory("llama", "causal").path
    peft, tokens = PeftSpec(target_modules="all-linear"), 64
    config = TrainConfig(base_dtype="float32", device="cpu", max_seq_length=tokens)
    run = loop._setup_model(path, tmp_path, "causal", None, peft, config, None, "supervised", NO_RESOURCES)
    estimate = memory.estimate_memory(json.loads((path / "config.json").read_text()), peft, run.config)
    run.model.train()
    ids = torch.randint(4, 90, (1, tokens), generator=torch.Generator().manual_seed(0))
    held = {p.untyped_storage().data_ptr() for p in run.model.parameters()}
    held |= {b.untyped_storage().data_ptr() for b in run.model.buffers()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:  # activations, each storage once however often it is saved
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        causal_loss(run.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    # The per-token rule counts k and v at full width and unfused attention, so it is meant to over-count
    # somewhat; on this model (k, v half the hidden width) about 2×.
    assert 0.4 * estimate["activations"] <= sum(saved.values()) <= estimate["activations"]


# -- a job that cannot fit the device -----------------------------------------------------------------------


def test_a_dpo_pair_counts_two_rows_and_full_reinforcement_a_second_base(tiny_case_factory):
    config_json = json.loads((tiny_case_factory("llama", "causal").path / "config.json").read_text())
    config = TrainConfig(base_dtype="float32", bf16=False, max_seq_length=32)

    def parts(spec, objective, **changes):
        return memory.estimate_memory(config_json, spec, replace(config, **changes), objective=objective)

    supervised, dpo = parts(PeftSpec(), "supervised"), parts(PeftSpec(), "dpo")
    assert dpo["activations"] == 2 * supervised["activations"] and dpo["base"] == supervised["base"]
    full = parts(PeftSpec(method="full"), "supervised")
    assert parts(PeftSpec(method="full"), "reinforcement")["base"] == 2 * full["base"]
    assert parts(PeftSpec(method="full"), "reinforcement", kl_coef=0.0)["base"] == full["base"]
    assert parts(PeftSpec(), "reinforcement") == supervised  # the adapter off is the reference: no copy


def test_all_linear_full_rank_8b_on_24_gb_fails_before_loading_naming_what_fits(
    llama_8b, tmp_path, cuda_with_24_gb, no_loading
):
    config = TrainConfig(device="cuda", max_seq_length=2048)
    peft = PeftSpec(target_modules="all-linear", rank=4096)  # r = k: no matrix of Llama-8B has k above 4,096
    with pytest.raises(DeviceMemoryError) as raised:
        run_training(llama_8b, CHATS, None, peft, config, tmp_path / "out")
    error = raised.value
    assert error.code == "out_of_memory" and error.tokens == 2048
    assert "24.0 GB free" in error.message

    resolved = replace(config, base_dtype="bfloat16", bf16=True, gradient_checkpointing=True)

    def total(spec: PeftSpec, cfg: TrainConfig) -> int:
        return memory.estimate_memory(LLAMA_8B, spec, cfg)["total"]

    assert total(peft, resolved) > FREE_24_GB  # r = k on every linear: ~16 GB of weights and ~19 GB of bases
    # The rank offered is the largest of the steps below the job's own rank that fits.
    rank = re.search(r"rank (\d+) \(", error.message)
    assert rank, error.message
    fitting = [r for r in preflight.RANK_STEPS
               if r < peft.rank and total(replace(peft, rank=r), resolved) <= FREE_24_GB]
    assert int(rank.group(1)) == fitting[0]
    length = re.search(r"max_seq_length ([\d,]+)", error.message)
    if length:
        assert total(peft, replace(resolved, max_seq_length=int(length.group(1).replace(",", "")))) <= FREE_24_GB
    assert "target_modules ['q_proj', 'v_proj']" in error.message


def test_a_default_spec_that_does_not_fit_is_offered_ranks_below_its_own_and_the_q_v_projections(
    llama_8b, tmp_path, monkeypatch, no_loading
):
    # The options are judged against the spec as it resolves (all-linear, r = DEFAULT_SVFIT_RANK), not as
    # written (None): give the default job a little less memory than it needs.
    resolved = TrainConfig(device="cuda", max_seq_length=2048, base_dtype="bfloat16", bf16=True,
                           gradient_checkpointing=True)

    def total(spec: PeftSpec) -> int:
        return memory.estimate_memory(LLAMA_8B, spec, resolved)["total"]

    free = total(PeftSpec()) - 10**8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with pytest.raises(DeviceMemoryError) as raised:
        run_training(llama_8b, CHATS, None, PeftSpec(), TrainConfig(device="cuda", max_seq_length=2048),
                     tmp_path / "out")
    message = raised.value.message
    rank = re.search(r"rank (\d+) \(", message)
    assert rank, message
    fitting = [r for r in preflight.RANK_STEPS if r < DEFAULT_SVFIT_RANK and total(PeftSpec(rank=r)) <= free]
    assert int(rank.group(1)) == fitting[0]
    # Fewer matrices than the all-linear the default resolves to.
    assert "target_modules ['q_proj', 'v_proj']" in message


def test_the_default_spec_on_8b_fits_24_gb_and_goes_on_to_load(llama_8b, tmp_path, cuda_with_24_gb, no_loading):
    # The default: all-linear at r = 256 (DEFAULT_SVFIT_RANK), the rank chosen to stay affordable at this size.
    with pytest.raises(Loaded):
        run_training(llama_8b, CHATS, None, PeftSpec(), TrainConfig(device="cuda", max_seq_length=2048),
                     tmp_path / "out")
    report = preflight.check_memory(llama_8b, "causal", None, PeftSpec(),
                                    TrainConfig(device="cuda", max_seq_length=2048, base_dtype="bfloat16", bf16=True),
                                    torch.device("cuda"))
    assert report["total_gb"] <= report["free_gb"] == 24.0
    assert report["gradient_checkpointing"]  # left automatic, and 2,048 tokens do not fit without it
    assert report["base_gb"] == pytest.approx(16.06, abs=0.01)  # 8.03 B parameters in bf16


def test_a_base_too_large_for_any_change_says_so(llama_8b, tmp_path, monkeypatch, no_loading):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 10**9, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with pytest.raises(DeviceMemoryError, match="use a smaller base model"):
        run_training(llama_8b, CHATS, None, PeftSpec(), TrainConfig(device="cuda"), tmp_path / "out")


# -- host memory ------------------------------------------------------------------------------------------


def test_too_little_host_memory_fails_before_loading(tiny_case_factory, tmp_path, monkeypatch, no_loading):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1024 kB\nMemFree:          16 kB\nMemAvailable:     64 kB\n")
    monkeypatch.setattr(preflight, "MEMINFO", meminfo)
    with pytest.raises(HostMemoryError) as raised:
        run_training(tiny_case_factory("llama", "causal").path, CHATS, None, PeftSpec(), TrainConfig(device="cpu"),
                     tmp_path / "out")
    assert raised.value.code == "insufficient_host_memory"
    assert raised.value.available == 64 * 1024 and raised.value.needed > raised.value.available


def test_host_bytes_follow_the_stated_load_assumptions(tiny_case_factory):
    path = tiny_case_factory("llama", "causal").path
    model = memory.shape_model(json.loads((path / "config.json").read_text()))
    stored = (path / "model.safetensors").stat().st_size  # fp32, as the tiny checkpoint is written
    params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert preflight.host_bytes_to_load(path, model, torch.float32, cpu) == stored
    assert preflight.host_bytes_to_load(path, model, torch.bfloat16, cpu) == stored + 2 * params
    assert preflight.host_bytes_to_load(path, model, torch.bfloat16, cuda) == largest * (4 + 2)


def test_available_host_memory_reads_meminfo_or_falls_back(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       2048 kB\nMemAvailable:    1000 kB\n")
    monkeypatch.setattr(preflight, "MEMINFO", meminfo)
    assert preflight.available_host_memory() == 1000 * 1024
    monkeypatch.setattr(preflight, "MEMINFO", tmp_path / "absent")
    assert preflight.available_host_memory() > 0  # os.sysconf's free pages


# -- what the pre-flight can read -----------------------------------------------------------------------------


def test_a_gguf_base_is_described_by_its_header(tmp_path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(96)
    writer.add_tensor("token_embd.weight", np.zeros((96, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = read_model_config(tmp_path)
    assert (config["model_type"], config["hidden_size"], config["num_key_value_heads"]) == ("llama", 32, 2)
    model = memory.shape_model(config)
    params = sum(p.numel() for p in model.parameters())
    # Dequantised to an fp32 state dict on the host first, whatever the device.
    assert preflight.host_bytes_to_load(tmp_path, model, torch.float32, torch.device("cpu")) == 4 * params


def test_an_unreadable_base_skips_the_checks_with_a_log_line(tmp_path, caplog):
    (tmp_path / "model.gguf").write_bytes(b"not a gguf file")
    with caplog.at_level(logging.INFO, logger=preflight.__name__):
        assert preflight.check_memory(tmp_path, "causal", None, PeftSpec(), TrainConfig(base_dtype="float32"),
                                      torch.device("cuda")) is None
    assert "pre-flight skipped" in caplog.text


def test_the_start_event_carries_the_estimate(tiny_case_factory, tmp_path):
    recorder = Recorder()
    run_training(tiny_case_factory("llama", "causal").path, CHATS, None, PeftSpec(),
                 TrainConfig(n_epochs=1, batch_size=4, device="cpu"), tmp_path / "out", recorder)
    estimate = recorder.info["memory_estimate"]
    assert estimate["free_gb"] is None and not estimate["gradient_checkpointing"]  # CPU: no device check
    assert estimate["total_gb"] == pytest.approx(sum(estimate[f"{part}_gb"] for part in preflight.PARTS), abs=0.01)
