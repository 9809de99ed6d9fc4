"""The job pipeline without Celery, on SQLite and a tiny random Llama: success, cancel, pause/resume,
failures with stable codes, and idempotent publishing after a crash."""

from __future__ import annotations

import csv
import io
import json
import re
import time

import pytest
import torch

from api.core.tables import Checkpoint, File, FineTunedModel
from svfit_core.errors import DeviceMemoryError, HostMemoryError, UnsupportedLayerError
from tests.worker.conftest import HYPERPARAMETERS, PEFT, clear_caches, preference_examples, prompt_examples
from tests.worker.helpers import adapter_tensors, assert_same_adapter
from worker import pipeline, publishing, recovery
from worker.reporting import JobReporter

pytestmark = pytest.mark.slow


def request_action_at(monkeypatch: pytest.MonkeyPatch, service, job_id: str, action: str, step: int) -> None:
    """Play the API's part: set `requested_action` once the run reaches `step`."""
    original = JobReporter.on_step

    def on_step(self, metrics):  # noqa: ANN001
        original(self, metrics)
        if metrics["step"] == step:
            service.update_job(job_id, requested_action=action)

    monkeypatch.setattr(JobReporter, "on_step", on_step)


def test_run_job_succeeds_and_publishes(service):
    job_id = service.add_job()

    assert pipeline.run_job(job_id) == "succeeded"

    job = service.job(job_id)
    assert job.status == "succeeded"
    assert job.error is None
    assert re.fullmatch(rf"ft:tiny-llama:org-test:unit:{job_id[6:18]}", job.fine_tuned_model)
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.finished_at and job.started_at and job.attempt == 1
    assert job.progress["step"] == job.progress["total_steps"] == 20
    assert job.requested_action is None

    messages = [e.message for e in service.events(job_id)]
    # Bases first (the default targets every linear of the blocks: 7 in each of 2 layers, one SVD each; with
    # progress written at once, one event a matrix), then training.
    assert messages[:15] == [f"Setting up bases: {i}/14 matrices" for i in range(1, 15)] + ["Fine-tuning job started"]
    started = next(e for e in service.events(job_id) if e.message == "Fine-tuning job started")
    assert started.data["memory_estimate"]["total_gb"] > 0  # the pre-flight's estimate, by part
    assert messages[-1] == "The job has successfully completed"
    metrics = [e.data for e in service.events(job_id) if e.type == "metrics"]
    train = [m for m in metrics if "train_loss" in m]
    valid = [m for m in metrics if "valid_loss" in m]
    assert [m["step"] for m in train] == list(range(1, 21))
    assert all(m["total_steps"] == 20 and m["train_mean_token_accuracy"] is not None for m in train)
    assert valid and all(m["valid_mean_token_accuracy"] is not None for m in valid)

    # Checkpoints: rows, servable model rows, published directories. Taken at steps 5 and 15
    # (checkpoint_every) and 10 and 20 (the epochs' ends); retention keeps every epoch and the newest step one.
    checkpoints = sorted(service.rows(Checkpoint, job_id=job_id), key=lambda c: c.step_number)
    assert [(c.step_number, c.kind) for c in checkpoints] == [(10, "epoch"), (15, "step"), (20, "epoch")]
    assert not service.store_path(publishing.checkpoint_key(job_id, 5)).exists()
    for ckpt in checkpoints:
        assert ckpt.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{ckpt.step_number}"
        assert ckpt.metrics["step"] == ckpt.step_number and "train_loss" in ckpt.metrics
        assert (service.store_path(ckpt.storage_key) / publishing.MANIFEST_NAME).is_file()
    assert job.last_checkpoint_step == checkpoints[-1].step_number
    models = {m.id: m for m in service.rows(FineTunedModel, job_id=job_id)}
    assert models[job.fine_tuned_model].step_number is None
    assert models[job.fine_tuned_model].parent == "tiny-llama"
    assert len(models) == len(checkpoints) + 1

    final = service.store_path(publishing.final_key(job_id))
    assert (final / "adapter_config.json").is_file()
    adapter_tensors(final)
    assert not list(final.parent.rglob("*.part"))
    assert not (service.settings.jobs_dir / job_id).exists(), "scratch space is cleaned up"

    # The results file.
    [results] = service.rows(File, purpose="fine-tune-results")
    assert job.result_files == [results.id]
    assert results.status == "processed" and results.org_id == "org-test"
    body = service.store_path(results.storage_key).read_bytes()
    assert results.bytes == len(body)
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert list(rows[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert all(r["train_loss"] for r in rows)
    assert any(r["valid_loss"] for r in rows)


def test_retention_keeps_the_newest_epochs_and_step_checkpoint(service, monkeypatch):
    monkeypatch.setenv("SVFIT_CHECKPOINT_KEEP_EPOCHS", "1")
    clear_caches()
    job_id = service.add_job(hyperparameters={**HYPERPARAMETERS, "n_epochs": 3})  # 30 steps, 10 per epoch

    assert pipeline.run_job(job_id) == "succeeded"

    kept = sorted((c.step_number, c.kind) for c in service.rows(Checkpoint, job_id=job_id))
    assert kept == [(25, "step"), (30, "epoch")]
    names = {m.id for m in service.rows(FineTunedModel, job_id=job_id)}
    assert names == {service.job(job_id).fine_tuned_model} | {
        f"{service.job(job_id).fine_tuned_model}:ckpt-step-{step}" for step, _ in kept
    }
    for step in (5, 10, 15, 20):
        assert not service.store_path(publishing.checkpoint_key(job_id, step)).exists(), step
    for step, _ in kept:
        assert service.store_path(publishing.checkpoint_key(job_id, step)).is_dir(), step


def test_cancel_through_requested_action(service, monkeypatch):
    job_id = service.add_job(validation=False)
    request_action_at(monkeypatch, service, job_id, "cancel", step=3)

    assert pipeline.run_job(job_id) == "cancelled"

    job = service.job(job_id)
    assert job.status == "cancelled"
    assert job.requested_action is None and job.finished_at is not None
    assert job.fine_tuned_model is None
    assert job.progress["step"] < 20
    assert isinstance(job.progress["epoch"], float), "clients read the epoch as a number"
    assert service.events(job_id)[-1].message == "Fine-tuning job cancelled"
    assert not service.store_path(publishing.final_key(job_id)).exists()
    assert not service.rows(FineTunedModel, job_id=job_id, step_number=None)


def test_pause_then_resume_equals_uninterrupted_run(service, monkeypatch):
    reference = service.add_job(validation=False)
    assert pipeline.run_job(reference) == "succeeded"

    job_id = service.add_job(validation=False)
    with monkeypatch.context() as patch:
        request_action_at(patch, service, job_id, "pause", step=7)
        assert pipeline.run_job(job_id) == "paused"

    job = service.job(job_id)
    assert job.status == "paused" and job.requested_action is None
    assert job.last_checkpoint_step is not None and 5 <= job.last_checkpoint_step < 20
    assert service.events(job_id)[-1].message == f"Fine-tuning job paused at step {job.last_checkpoint_step}"
    assert service.store_path(publishing.checkpoint_key(job_id, job.last_checkpoint_step)).is_dir()
    paused_at = job.last_checkpoint_step

    # A paused job's message is moot; the API's resume puts it back in line.
    assert pipeline.run_job(job_id) == "paused"
    service.update_job(job_id, status="queued")
    assert pipeline.run_job(job_id) == "succeeded"

    job = service.job(job_id)
    assert job.attempt == 2
    assert f"Fine-tuning job resumed from step {paused_at}" in [e.message for e in service.events(job_id)]
    assert_same_adapter(
        service.store_path(publishing.final_key(reference)), service.store_path(publishing.final_key(job_id))
    )
    # One CSV row per step even though steps after the checkpoint ran twice.
    [results] = [f for f in service.rows(File, purpose="fine-tune-results") if f.id in job.result_files]
    steps = [int(r["step"]) for r in csv.DictReader(io.StringIO(service.store_path(results.storage_key).read_text()))]
    assert steps == list(range(1, 21))


def test_worker_shutdown_checkpoints_and_requeues_the_job(service, monkeypatch):
    sent: list[str] = []
    monkeypatch.setattr("worker.dispatch.enqueue_job", lambda job_id, **kw: sent.append(job_id))
    job_id = service.add_job(validation=False)
    original = JobReporter.on_step

    def on_step(self, metrics):  # noqa: ANN001
        original(self, metrics)
        if metrics["step"] == 6:
            recovery.request_shutdown()  # what Celery's worker_shutting_down signal does on SIGTERM

    monkeypatch.setattr(JobReporter, "on_step", on_step)
    try:
        assert pipeline.run_job(job_id) == "queued"
    finally:
        recovery._shutdown.clear()

    job = service.job(job_id)
    assert (job.status, job.worker_id, job.last_checkpoint_step) == ("queued", None, 6)
    assert service.events(job_id)[-1].message == "Worker stopped; the job will resume from step 6"
    assert sent == [job_id], "re-enqueued for the next worker"
    monkeypatch.setattr(JobReporter, "on_step", original)
    assert pipeline.run_job(job_id) == "succeeded"


DPO_COLUMNS = ["train_reward_margin", "train_chosen_reward", "train_rejected_reward",
               "valid_reward_margin", "valid_chosen_reward", "valid_rejected_reward"]


def add_dpo_job(service, *, validation: bool = True, beta: float = 0.3) -> str:
    hyperparameters = {**HYPERPARAMETERS, "beta": beta}
    return service.add_job(
        validation=False,
        training_file=service.add_file(preference_examples()),
        validation_file=service.add_file(preference_examples(8, offset=3)) if validation else None,
        hyperparameters=hyperparameters,
        method={"type": "dpo", "dpo": {"hyperparameters": {k: v for k, v in hyperparameters.items()
                                                          if k != "learning_rate"}}},
    )


def test_a_dpo_job_trains_with_its_beta_and_reports_rewards(service):
    job_id = add_dpo_job(service)

    assert pipeline.run_job(job_id) == "succeeded", service.job(job_id).error

    job = service.job(job_id)
    started = next(e for e in service.events(job_id) if e.message == "Fine-tuning job started")
    assert started.data["config"]["dpo_beta"] == 0.3  # job_spec.train_config passed the job's beta
    metrics = [e for e in service.events(job_id) if e.type == "metrics"]
    train = [e.data for e in metrics if "train_loss" in e.data]
    valid = [e.data for e in metrics if "valid_loss" in e.data]
    assert [m["step"] for m in train] == list(range(1, 21))
    for m in train:
        assert m["train_reward_margin"] == pytest.approx(m["train_chosen_reward"] - m["train_rejected_reward"])
        assert 0 <= m["train_mean_token_accuracy"] <= 1
    assert train[0]["train_loss"] == pytest.approx(0.6931, abs=0.05)  # log 2: the policy starts as the reference
    assert valid and all(m["valid_reward_margin"] is not None and "valid_chosen_reward" in m for m in valid)
    assert any("reward margin=" in e.message for e in metrics)

    checkpoints = service.rows(Checkpoint, job_id=job_id)
    assert checkpoints and all("train_reward_margin" in c.metrics for c in checkpoints)
    [results] = [f for f in service.rows(File, purpose="fine-tune-results") if f.id in job.result_files]
    rows = list(csv.DictReader(io.StringIO(service.store_path(results.storage_key).read_text())))
    assert list(rows[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy",
                             *DPO_COLUMNS]
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert all(r["train_reward_margin"] for r in rows) and any(r["valid_reward_margin"] for r in rows)


def test_a_dpo_job_paused_and_resumed_equals_an_uninterrupted_one(service, monkeypatch):
    # The reference log-probabilities come from the starting model, not from the checkpoint resumed.
    reference = add_dpo_job(service, validation=False)
    assert pipeline.run_job(reference) == "succeeded"

    job_id = add_dpo_job(service, validation=False)
    with monkeypatch.context() as patch:
        request_action_at(patch, service, job_id, "pause", step=7)
        assert pipeline.run_job(job_id) == "paused"
    service.update_job(job_id, status="queued")
    assert pipeline.run_job(job_id) == "succeeded"
    assert_same_adapter(
        service.store_path(publishing.final_key(reference)), service.store_path(publishing.final_key(job_id))
    )


REINFORCEMENT_COLUMNS = ["train_reward", "train_kl", "train_answer_tokens", "valid_reward"]
# Contains the line's opinion word: the tiny random model says one now and then, so rewards vary.
OPINION_GRADER = {"type": "string_check", "name": "opinion", "input": "{{sample.output_text}}",
                  "reference": "{{item.opinion}}", "operation": "like"}


def add_reinforcement_job(service, *, validation: bool = True) -> str:
    reinforcement = {"compute_multiplier": 1.0, "eval_interval": 5, "eval_samples": 2, "reasoning_effort": "default"}
    hyperparameters = {**HYPERPARAMETERS, "n_epochs": 1, **reinforcement}
    return service.add_job(
        validation=False,
        training_file=service.add_file(prompt_examples()),
        validation_file=service.add_file(prompt_examples(4, offset=3)) if validation else None,
        hyperparameters=hyperparameters,
        peft={**PEFT, "max_completion_tokens": 6},
        method={"type": "reinforcement", "reinforcement": {
            "grader": OPINION_GRADER,
            "hyperparameters": {k: v for k, v in hyperparameters.items() if k != "learning_rate"}}},
    )


def test_a_reinforcement_job_samples_grades_and_reports_rewards(service):
    job_id = add_reinforcement_job(service)

    assert pipeline.run_job(job_id) == "succeeded", service.job(job_id).error

    job = service.job(job_id)
    started = next(e for e in service.events(job_id) if e.message == "Fine-tuning job started")
    config = started.data["config"]
    assert (config["samples_per_prompt"], config["eval_samples"], config["eval_every"]) == (4, 2, 5)
    assert config["max_completion_tokens"] == 6
    metrics = [e for e in service.events(job_id) if e.type == "metrics"]
    train = [e.data for e in metrics if "train_loss" in e.data]
    valid = [e.data for e in metrics if "valid_reward" in e.data]
    assert [m["step"] for m in train] == list(range(1, 11))
    assert all(0 <= m["train_reward"] <= 1 and m["train_kl"] >= 0 and 1 <= m["train_answer_tokens"] <= 6
               for m in train)
    assert train[0]["train_mean_token_accuracy"] is None  # reinforcement measures rewards, not accuracy
    assert [m["step"] for m in valid] == [5, 10] and all(0 <= m["valid_reward"] <= 1 for m in valid)
    assert any("mean reward=" in e.message for e in metrics)

    [results] = [f for f in service.rows(File, purpose="fine-tune-results") if f.id in job.result_files]
    rows = list(csv.DictReader(io.StringIO(service.store_path(results.storage_key).read_text())))
    assert list(rows[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy",
                             *REINFORCEMENT_COLUMNS]
    assert all(r["train_reward"] for r in rows) and [r["step"] for r in rows if r["valid_reward"]] == ["5", "10"]
    meta = json.loads((service.store_path(publishing.final_key(job_id)) / "training_meta.json").read_text())
    assert meta["objective"] == "reinforcement"


def test_samples_the_grader_cannot_grade_are_told_in_the_jobs_events(service):
    job_id = add_reinforcement_job(service, validation=False)
    method = service.job(job_id).method
    grader = {**OPINION_GRADER, "reference": "{{item.missing}}"}  # no line has it
    service.update_job(job_id, method={**method, "reinforcement": {**method["reinforcement"], "grader": grader}})
    assert pipeline.run_job(job_id) == "succeeded", service.job(job_id).error
    [warning] = [e for e in service.events(job_id) if "could not be graded" in e.message]
    assert warning.level == "warn" and warning.message.startswith("160 of 160 sampled answers")


def test_a_reinforcement_job_paused_and_resumed_equals_an_uninterrupted_one(service, monkeypatch):
    reference = add_reinforcement_job(service, validation=False)
    assert pipeline.run_job(reference) == "succeeded"

    job_id = add_reinforcement_job(service, validation=False)
    with monkeypatch.context() as patch:
        request_action_at(patch, service, job_id, "pause", step=3)
        assert pipeline.run_job(job_id) == "paused"
    service.update_job(job_id, status="queued")
    assert pipeline.run_job(job_id) == "succeeded"
    assert_same_adapter(
        service.store_path(publishing.final_key(reference)), service.store_path(publishing.final_key(job_id))
    )


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing records it on the job."""


def test_crash_mid_publish_then_retry_publishes_once(service, monkeypatch):
    job_id = service.add_job(validation=False)
    original = publishing.ensure_results_file

    def crash_after_dir_publish(*args, **kwargs):  # noqa: ANN002, ANN003
        raise Crash()

    # First attempt dies after the final directory is in place but before the rows commit.
    monkeypatch.setattr(publishing, "ensure_results_file", crash_after_dir_publish)
    with pytest.raises(Crash):
        pipeline.run_job(job_id)
    assert service.store_path(publishing.final_key(job_id)).is_dir()
    job = service.job(job_id)
    assert job.status == "running" and job.fine_tuned_model is None

    # The reaper notices the silent worker; the retry resumes and publishes.
    monkeypatch.setattr(publishing, "ensure_results_file", original)
    service.update_job(job_id, heartbeat_at=time.time() - 3600)
    monkeypatch.setattr("worker.dispatch.enqueue_job", lambda job_id, **kw: True)
    assert recovery.reap_stale_jobs() == [job_id]
    assert pipeline.run_job(job_id) == "succeeded"

    job = service.job(job_id)
    assert len(service.rows(FineTunedModel, job_id=job_id, step_number=None)) == 1
    assert len(service.rows(File, purpose="fine-tune-results")) == 1
    assert len({c.step_number for c in service.rows(Checkpoint, job_id=job_id)}) == len(
        service.rows(Checkpoint, job_id=job_id)
    )
    assert not list(service.store_path(f"jobs/{job_id}").rglob("*.part"))


def test_publish_dir_is_atomic_and_idempotent(service, tmp_path):
    from api.core.storage import get_storage

    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    storage = get_storage()
    key = "jobs/ftjob-x/final"
    # A leftover from a crashed copy is discarded, not merged.
    stale = storage.path(key).with_name("final.part")
    stale.mkdir(parents=True)
    (stale / "junk").write_text("half")

    target = publishing.publish_dir(storage, src, key, {"job_id": "ftjob-x"})
    assert sorted(p.name for p in target.iterdir()) == ["adapter_model.safetensors", publishing.MANIFEST_NAME]
    assert not stale.exists()
    (src / "adapter_model.safetensors").write_bytes(b"other")
    assert publishing.publish_dir(storage, src, key, {}) == target
    assert (target / "adapter_model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize(
    "case, code, param",
    [
        ("unknown_model", "model_not_found", "model"),
        ("bad_training_file", "invalid_training_file", "training_file"),
        ("missing_file_content", "invalid_training_file", "training_file"),
        ("internal", "internal_error", None),
        ("oom", "out_of_memory", None),
        ("quantized", "unsupported_layer", "model"),
        ("more_gpus_than_the_worker_sees", "insufficient_devices", "peft.gpus"),
    ],
)
def test_failures_set_stable_error_codes(service, monkeypatch, case, code, param):
    overrides = {}
    if case == "unknown_model":
        overrides["model"] = "no-such-model"
    elif case == "bad_training_file":
        overrides["training_file"] = service.add_file(b'{"messages": [{"role": "user"}]}\nnot json\n')
    elif case == "missing_file_content":
        file_id = service.add_file([{"prompt": "a", "completion": "b"}] * 10)
        service.store_path(f"files/{file_id}.jsonl").unlink()
        overrides["training_file"] = file_id
    elif case == "more_gpus_than_the_worker_sees":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU worker, whatever runs the test
        overrides["peft"] = {**PEFT, "gpus": 2}
    elif case in ("internal", "oom", "quantized"):
        error = {
            "internal": RuntimeError("secret detail"),
            "oom": torch.OutOfMemoryError("CUDA out of memory"),
            "quantized": UnsupportedLayerError("module 'q_proj' is a Linear4bit", module="q_proj"),
        }[case]

        def explode(*args, **kwargs):  # noqa: ANN002, ANN003
            raise error

        monkeypatch.setattr("svfit_core.training.run_training", explode)
    job_id = service.add_job(validation=False, **overrides)

    assert pipeline.run_job(job_id) == "failed"

    job = service.job(job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert set(job.error) == {"code", "message", "param"}
    assert job.error["code"] == code and job.error["param"] == param
    assert "Traceback" not in job.error["message"] and "secret" not in job.error["message"]
    last = service.events(job_id)[-1]
    assert last.level == "error" and last.message == job.error["message"]


def test_memory_errors_name_what_to_change():
    too_long = DeviceMemoryError("needs 38.0 GB, 24.0 GB free; max_seq_length 1,024 would fit", tokens=2048)
    assert pipeline.error_for(too_long) == ("out_of_memory", too_long.message, "peft.max_seq_length")
    small_host = HostMemoryError("needs 40.0 GB of host memory, 8.0 GB available", needed=40, available=8)
    assert pipeline.error_for(small_host) == ("insufficient_host_memory", small_host.message, "model")
    # A raw out-of-memory keeps its code; its advice no longer names batch_size, which micro-batching made moot.
    code, message, param = pipeline.error_for(torch.OutOfMemoryError("CUDA out of memory"))
    assert (code, param) == ("out_of_memory", None)
    assert "batch_size" not in message and "max_seq_length" in message


def test_a_job_continuing_a_fine_tune_starts_from_it_and_publishes_an_adapter_of_the_base(service):
    parent_id = service.add_job(validation=False)
    assert pipeline.run_job(parent_id) == "succeeded"
    parent = service.job(parent_id)

    # A rate too small to move far: what the weights end as says where they started.
    crawl = {**HYPERPARAMETERS, "beta": 0.3, "learning_rate": 1e-5}
    job_id = add_dpo_job(service, validation=False)
    service.update_job(job_id, model=parent.fine_tuned_model, hyperparameters=crawl)
    assert pipeline.run_job(job_id) == "succeeded", service.job(job_id).error

    job = service.job(job_id)
    # Named and parented by the base, like every fine-tune: routing and exports need no chain.
    assert job.fine_tuned_model.startswith(f"ft:{parent.model}:")
    [row] = service.rows(FineTunedModel, id=job.fine_tuned_model)
    assert row.parent == parent.model
    # DPO's reference is the fine-tune it continued: the loss starts at log 2 there too.
    first = next(e.data for e in service.events(job_id) if e.type == "metrics" and e.data.get("step") == 1)
    assert first["train_loss"] == pytest.approx(0.6931, abs=0.05)
    # Its σ are the parent's, moved a little; the same job from the base ends near the base's.
    from_base = add_dpo_job(service, validation=False)
    service.update_job(from_base, hyperparameters=crawl)
    assert pipeline.run_job(from_base) == "succeeded"
    sigma = {j: {k: t for k, t in adapter_tensors(service.store_path(publishing.final_key(j))).items()
                 if "sigma" in k} for j in (parent_id, job_id, from_base)}
    assert sigma[parent_id] and sigma[parent_id].keys() == sigma[job_id].keys()

    def distance(a, b):
        return sum(float((sigma[a][k] - sigma[b][k]).abs().sum()) for k in sigma[a])

    assert 0 < distance(job_id, parent_id) < 0.01 * distance(from_base, parent_id)
