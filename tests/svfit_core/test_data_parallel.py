"""Data-parallel training (svfit_core/training/distributed.py) on CPU with gloo: two processes train what one
process trains on the same global batches, pause and resume exactly, only rank 0 writes (checkpoints,
adapters, bases), a stop asked for on rank 0 (during setup or between steps) stops every rank, a failure on
another rank reaches the caller with its own code, and a run asking for more GPUs than the process sees
fails before loading anything."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from svfit_core.bases import DirectoryBasisStore
from svfit_core.errors import DeviceMemoryError, InsufficientDevicesError, RankFailedError
from svfit_core.training import PeftSpec, TrainConfig, run_training
from svfit_core.training import distributed
from svfit_core.training.run_config import HyperparameterError
from tests.svfit_core.test_training import CHAT, PAIRS, SVFIT_QV, Recorder

pytestmark = pytest.mark.slow

# 12 chat examples in batches of 5: steps of 5, 5 and 2 examples, so the ranks' shares differ in size; two
# micro-batches per rank and step; an odd validation set.
CHAT_CONFIG = TrainConfig(n_epochs=2, batch_size=5, gradient_accumulation_steps=2, eval_every=2,
                          learning_rate=5e-2, seed=0, device="cpu")
# 12 pairs in batches of 11: the second step has one example, so rank 1's share of it is empty.
PAIR_CONFIG = TrainConfig(n_epochs=2, batch_size=11, learning_rate=5e-2, seed=1, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread per process (the spawned rank takes the caller's count): two cores, two ranks."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RecordingStore(DirectoryBasisStore):
    """A basis store that notes which process saved each entry (it pickles to the other rank as it is). Saving
    is slow, so a rank that did not wait for rank 0 to finish would find entries missing and save them too."""

    def save(self, key, tensors):
        time.sleep(0.25)
        super().save(key, tensors)
        with open(self.root / "saves.log", "a") as log:
            log.write(f"{os.getpid()} {key}\n")

    def saves(self) -> list[tuple[int, str]]:
        lines = (self.root / "saves.log").read_text().splitlines()
        return [(int(pid), key) for pid, key in (line.split() for line in lines)]


def train(path, examples, valid, config, out, stop_after=None, resume_from=None, bases=None, peft=SVFIT_QV):
    recorder = Recorder(stop_after)
    result = run_training(path, examples, valid, peft, config, out, recorder, resume_from=resume_from,
                          bases=bases)
    return result, recorder


def trained(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """What training changed in an adapter: σ of each layer and the classification head (not U, s, V)."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    return {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in ("U", "V", "s")}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.fixture(scope="module")
def llama(tiny_case_factory) -> Path:
    return tiny_case_factory("llama", "causal").path


@pytest.fixture(scope="module")
def chat_runs(llama, tmp_path_factory):
    """The chat job in one process, and in two with a basis store: (result, recorder, output dir) each."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    store = RecordingStore(tmp_path_factory.mktemp("bases"))
    single = train(llama, CHAT, CHAT[:5], CHAT_CONFIG, one)
    double = train(llama, CHAT, CHAT[:5], replace(CHAT_CONFIG, world_size=2), two, bases=store)
    return (*single, one), (*double, two), store


def test_two_processes_train_what_one_process_trains(chat_runs):
    (single, single_rec, one), (double, double_rec, two), _ = chat_runs
    assert double.ended_by == single.ended_by == "completion" and double.step == single.step == 6
    assert max_difference(trained(one / "final"), trained(two / "final")) <= 1e-5
    # The reported metrics are the whole batch's, summed over both ranks.
    assert double.trained_tokens == single.trained_tokens
    assert [m["step"] for m in double_rec.steps] == [m["step"] for m in single_rec.steps]
    assert double_rec.losses == pytest.approx(single_rec.losses, rel=1e-5)
    assert [m["train_mean_token_accuracy"] for m in double_rec.steps] == pytest.approx(
        [m["train_mean_token_accuracy"] for m in single_rec.steps])
    assert [m["valid_loss"] for m in double_rec.evals] == pytest.approx(
        [m["valid_loss"] for m in single_rec.evals], rel=1e-5)
    assert double_rec.info["config"]["world_size"] == 2


def test_only_rank_0_writes_and_the_bases_are_computed_once(chat_runs):
    (_, single_rec, one), (_, double_rec, two), store = chat_runs
    # Rank 0 reported every checkpoint once, and the output folder holds exactly what one process writes
    # (the bases live in the store, not in the adapters, so only the file sizes differ).
    expected = [(step, two / "checkpoints" / f"step-{step}") for step, _ in single_rec.checkpoints]
    assert double_rec.checkpoints == expected
    assert files(two) == files(one) and not [name for name in files(two) if name.endswith(".part")]
    # Rank 0 computed and kept each of the 4 bases (q and v of 2 layers); rank 1 read them.
    saves = store.saves()
    assert len(saves) == len({key for _, key in saves}) == 4
    assert {pid for pid, _ in saves} == {os.getpid()}


def test_a_classifier_and_its_head_train_alike_even_with_an_empty_share(tiny_case_factory, tmp_path):
    path = tiny_case_factory("llama", "classification").path
    single, single_rec = train(path, PAIRS, PAIRS[:3], PAIR_CONFIG, tmp_path / "one")
    double, double_rec = train(path, PAIRS, PAIRS[:3], replace(PAIR_CONFIG, world_size=2), tmp_path / "two")
    one, two = trained(tmp_path / "one" / "final"), trained(tmp_path / "two" / "final")
    assert any("score" in name for name in one)  # the head is trained and saved
    assert max_difference(one, two) <= 1e-5
    assert double_rec.losses == pytest.approx(single_rec.losses, rel=1e-5)
    assert double.step == single.step == 4


def test_dpo_in_two_processes_trains_what_one_process_trains(llama, tmp_path):
    from tests.svfit_core.test_preference import PREFERENCES

    # 8 pairs in batches of 3: steps of 3, 3 and 2 pairs, so the ranks' shares differ in size.
    config = replace(CHAT_CONFIG, batch_size=3, gradient_accumulation_steps=1)
    single, single_rec = train(llama, PREFERENCES, PREFERENCES[:3], config, tmp_path / "one")
    double, double_rec = train(llama, PREFERENCES, PREFERENCES[:3], replace(config, world_size=2), tmp_path / "two")
    assert max_difference(trained(tmp_path / "one" / "final"), trained(tmp_path / "two" / "final")) <= 1e-5
    assert double_rec.losses == pytest.approx(single_rec.losses, rel=1e-5)
    for key in ("train_reward_margin", "train_mean_token_accuracy"):
        assert [m[key] for m in double_rec.steps] == pytest.approx([m[key] for m in single_rec.steps], abs=1e-6)
    assert [m["valid_reward_margin"] for m in double_rec.evals] == pytest.approx(
        [m["valid_reward_margin"] for m in single_rec.evals], abs=1e-6)
    assert double.step == single.step == 6


def test_a_paused_two_process_run_resumes_exactly_with_dropout(tiny_case_factory, tmp_path):
    # BERT's dropout draws from each rank's generator: resuming must give every rank the same draws.
    path = tiny_case_factory("bert", "classification").path
    config = replace(PAIR_CONFIG, batch_size=5, n_epochs=1, world_size=2)  # shares of 3 and 2: unequal draws
    peft = replace(SVFIT_QV, target_modules=["query", "value"])  # BERT's names for q and v
    full, full_rec = train(path, PAIRS, None, config, tmp_path / "full", peft=peft)
    # Rank 0's callbacks pause after step 1; rank 1 must stop there too, or the run would fail.
    paused, paused_rec = train(path, PAIRS, None, config, tmp_path / "out", stop_after=1, peft=peft)
    assert paused.ended_by == "pause" and paused.step == 1
    assert paused.last_checkpoint == tmp_path / "out" / "checkpoints" / "step-1"

    resumed, resumed_rec = train(path, PAIRS, None, config, tmp_path / "out", resume_from=paused.last_checkpoint,
                                 peft=peft)
    assert resumed.ended_by == full.ended_by == "completion" and resumed.step == full.step == 3
    assert paused_rec.losses + resumed_rec.losses == full_rec.losses
    assert resumed.trained_tokens == full.trained_tokens
    resumed_tensors, full_tensors = trained(tmp_path / "out" / "final"), trained(tmp_path / "full" / "final")
    assert all(torch.equal(resumed_tensors[k], full_tensors[k]) for k in full_tensors)


def test_a_stop_asked_for_while_rank_0_sets_up_stops_every_rank(llama, tmp_path):
    recorder = Recorder(decision="cancel")
    recorder.stop_after_matrices = 1
    result = run_training(llama, CHAT, None, SVFIT_QV, replace(CHAT_CONFIG, world_size=2), tmp_path / "out",
                          recorder)
    # Rank 1, waiting for rank 0's setup, got the decision and returned too (else the launch would fail).
    assert result.ended_by == "cancel" and result.step == 0
    assert recorder.setup_progress == [(1, 4)] and not recorder.info


def fail_on_rank_1(callbacks=None):
    """A target for ``launch``: rank 1 cannot fit its share of a step, rank 0 can."""
    ranks = distributed.joined(2, "cpu")
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    failure = DeviceMemoryError("one example of 9 tokens does not fit", tokens=9) if ranks.rank == 1 else None
    ranks.sum_step([param], [1.0, 2, 3], failure)


def test_a_failure_on_another_rank_stops_every_rank_and_reaches_the_caller_with_its_code():
    with pytest.raises(RankFailedError) as info:
        distributed.launch(fail_on_rank_1, 2, "cpu", None)
    assert info.value.code == "out_of_memory" and info.value.rank == 1
    assert info.value.message == "one example of 9 tokens does not fit"
    assert isinstance(info.value.__cause__, distributed.PeerFailedError)


def test_more_gpus_than_the_process_sees_fail_before_loading(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU worker, whatever runs the test
    with pytest.raises(InsufficientDevicesError) as info:
        run_training(llama, CHAT, None, PeftSpec(), TrainConfig(world_size=2), tmp_path / "out")
    assert info.value.code == "insufficient_devices" and (info.value.requested, info.value.visible) == (2, 0)
    assert "2 processes with one GPU each" in info.value.message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("values, param", [
    ({"world_size": 0}, "world_size"),
    ({"world_size": 2.0}, "world_size"),
    ({"world_size": True}, "world_size"),
    ({"world_size": 2, "device": "cuda:1"}, "device"),
    ({"world_size": 2, "device": "mps"}, "device"),
])
def test_world_size_and_its_device_are_validated(values, param):
    with pytest.raises(HyperparameterError) as info:
        TrainConfig(**values).validate()
    assert info.value.param == param
