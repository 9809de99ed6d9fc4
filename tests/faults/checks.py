"""What every fault test asserts once the dust settles: the job trained to completion exactly once, the
store holds no torn artifact and everything published loads, and the adapter equals an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from api.core.job_spec import peft_spec, train_config
from api.core.settings import Settings
from api.core.tables import Job
from tests.faults.cluster import BASE_MODEL, Cluster
from tests.worker.helpers import assert_same_adapter
from worker import publishing


def assert_trained_once(cluster: Cluster, job_id: str) -> Job:
    """Succeeded, with one model row, one results file and one success event: never completed twice."""
    job = cluster.job(job_id)
    assert job.status == "succeeded", (job.status, job.error, cluster.logs())
    assert [m.id for m in cluster.model_rows(job_id) if m.step_number is None] == [job.fine_tuned_model]
    assert len(job.result_files) == 1
    messages = cluster.messages(job_id)
    assert sum(m.startswith("New fine-tuned model created") for m in messages) == 1, messages
    assert messages.count("The job has successfully completed") == 1, messages
    # A fresh start happens once; every later attempt resumes (from a checkpoint) or restarts after a loss.
    assert messages.count("Fine-tuning job started") <= job.attempt, messages
    return job


def _check_manifest(folder: Path) -> None:
    manifest = json.loads((folder / publishing.MANIFEST_NAME).read_text())
    assert manifest["format_version"] == publishing.PUBLISH_FORMAT_VERSION
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, f"{folder}/{name} is torn"


def assert_store_clean(cluster: Cluster, job_id: str, models_dir: Path) -> None:
    """No `.part` left under the job's store prefix, and every published directory is whole and loads."""
    from transformers import AutoModelForCausalLM

    from svfit_core import load_svfit_adapter

    job_root = cluster.store_root() / "jobs" / job_id
    leftovers = [p for p in job_root.rglob("*") if p.name.endswith(".part")]
    assert not leftovers, leftovers
    published = [cluster.store_root() / c.storage_key for c in cluster.checkpoint_rows(job_id)]
    published.append(cluster.store_root() / publishing.final_key(job_id))
    for folder in published:
        assert folder.is_dir(), f"a row points at {folder}, which is not there"
        _check_manifest(folder)
        # Loading wraps the base model's layers in place, so each adapter gets a fresh copy of the base.
        base = AutoModelForCausalLM.from_pretrained(models_dir / BASE_MODEL, dtype=torch.float32)
        load_svfit_adapter(base, folder)


class ReferenceRuns:
    """The final adapter of an uninterrupted run of a job's exact configuration, trained in this process
    (one thread, as the workers) and cached: jobs differing only in suffix share one."""

    def __init__(self, root: Path, models_dir: Path, train_path: Path):
        self.root = root
        self.models_dir = models_dir
        self.train_path = train_path
        self._done: dict[str, Path] = {}

    def adapter(self, job: Job) -> Path:
        from svfit_core.bases import DirectoryBasisStore
        from svfit_core.training.data import load_examples
        from svfit_core.training import run_training

        key = json.dumps([job.hyperparameters, job.peft, job.seed], sort_keys=True)
        if key not in self._done:
            out = self.root / f"reference-{len(self._done)}"
            config = train_config(
                job.hyperparameters, job.peft, seed=int(job.seed),
                default_checkpoint_every=Settings(data_dir=self.root).default_checkpoint_every,
            )
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                # With a basis store, as the worker trains: the adapter holds σ and the keys of its bases.
                result = run_training(
                    self.models_dir / BASE_MODEL, load_examples(self.train_path), None,
                    peft_spec(job.peft), config, out, bases=DirectoryBasisStore(self.root / "bases"),
                )
            finally:
                torch.set_num_threads(threads)
            assert result.ended_by == "completion" and result.adapter_dir is not None
            self._done[key] = Path(result.adapter_dir)
        return self._done[key]

    def assert_matches(self, cluster: Cluster, job_id: str) -> None:
        """Bit-for-bit the adapter an uninterrupted run produces (CPU, fixed seed)."""
        job = cluster.job(job_id)
        assert_same_adapter(self.adapter(job), cluster.store_root() / publishing.final_key(job_id))
