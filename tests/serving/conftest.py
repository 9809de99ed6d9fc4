"""Fixtures for the inference tests: a tiny chat Llama and a tiny BERT as base models, adapters of every
method written the way training writes them (adapter files + ``training_meta.json``), and an app whose
organization owns them as fine-tunes and checkpoints.

Adapters are made by perturbing freshly injected weights (σ for SVFit, B for LoRA, every weight for a full
fine-tune) with a seeded generator: training would only make the tests slower, not the serving different.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from api.core.settings import Settings
from api.core.tables import FineTunedModel, Job
from api.main import create_app
from api.services.keys import create_api_key
from serving.embedded import ReplicaThread
from svfit_core import SVFitConfig, export_merged, inject_svfit, save_svfit_adapter
from testkit.tiny_models import build_tiny, load_tiny

LLAMA = "tiny-llama"
BERT = "tiny-bert"
LABELS = ["negative", "positive"]
# The served classifier: an SVFit fine-tune of the tiny BERT (its head and pooler trained in full).
CLF = dict(seed=40, targets=None, task="classification", scale=0.3)


def fail_shared_forward(monkeypatch: pytest.MonkeyPatch, on_call: int) -> None:
    """Make the shared-base lane's `on_call`-th forward (1-based) raise, as a kernel failure would; every
    other call runs the real forward."""
    from serving.lanes import SharedBaseLane

    original = SharedBaseLane.forward
    calls = {"n": 0}

    def forward(self, tags, **inputs):
        calls["n"] += 1
        if calls["n"] == on_call:
            raise RuntimeError("simulated kernel failure")
        return original(self, tags, **inputs)

    monkeypatch.setattr(SharedBaseLane, "forward", forward)


def training_meta(method: str, task: str = "causal", labels: list[str] | None = None, step: int = 10) -> dict:
    return {"format_version": 1, "method": method, "task": task, "label_names": labels, "step": step}


def write_meta(folder: Path, meta: dict) -> Path:
    (folder / "training_meta.json").write_text(json.dumps(meta))
    return folder


def perturbed_svfit_model(base_dir: Path, seed: int, *, rank: int | None = 8, targets="all-linear",
                          scale: float = 0.5, task: str = "causal"):
    """An SVFitModel whose σ moved by seeded noise (scaled to each σ), and whose saved modules (a
    classifier's head and pooler) moved too: the same seed gives the same model."""
    model = load_tiny(base_dir, task)
    svfit = inject_svfit(model, SVFitConfig(rank=rank, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in svfit.svfit_layers().values():
            layer.sigma.mul_(1 + scale * torch.randn(layer.sigma.shape, generator=g))
        for p in svfit.head_parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return svfit


def perturbed_svfit(base_dir: Path, out: Path, seed: int, *, task: str = "causal", **options) -> Path:
    """``perturbed_svfit_model``'s adapter, saved as training saves it."""
    save_svfit_adapter(perturbed_svfit_model(base_dir, seed, task=task, **options), out)
    return write_meta(out, training_meta("svfit", task, LABELS if task == "classification" else None))


def perturbed_lora(base_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    model = load_tiny(base_dir, "causal")
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    peft.save_pretrained(out)
    return write_meta(out, training_meta("lora"))


def perturbed_full(base_dir: Path, out: Path, seed: int) -> Path:
    model = load_tiny(base_dir, "causal")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return write_meta(out, training_meta("full"))


def merged_as_full(base_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """The SVFit adapter folded into a whole model, served as a full fine-tune would be."""
    from svfit_core import load_svfit_adapter

    svfit = load_svfit_adapter(load_tiny(base_dir, "causal"), adapter_dir)
    export_merged(svfit, None, out)
    return write_meta(out, training_meta("full"))


@dataclass
class Zoo:
    """Base model folders and adapter folders by name."""

    models_dir: Path
    adapters: dict[str, Path] = field(default_factory=dict)

    @property
    def llama(self) -> Path:
        return self.models_dir / LLAMA

    @property
    def bert(self) -> Path:
        return self.models_dir / BERT


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    root = tmp_path_factory.mktemp("inference-zoo")
    models = root / "models"
    models.mkdir()
    build_tiny("llama", "causal", root).rename(models / LLAMA)
    build_tiny("bert", "classification", root).rename(models / BERT)
    z = Zoo(models)
    a = root / "adapters"
    z.adapters["sv0"] = perturbed_svfit(z.llama, a / "sv0", 0)
    z.adapters["sv1"] = perturbed_svfit(z.llama, a / "sv1", 1)
    z.adapters["sv2"] = perturbed_svfit(z.llama, a / "sv2", 2, rank=16)  # a larger rank: a grown basis
    z.adapters["sv_qv"] = perturbed_svfit(z.llama, a / "sv_qv", 3, rank=None, targets=None)  # other targets, r = k
    z.adapters["sv0_ckpt"] = perturbed_svfit(z.llama, a / "sv0_ckpt", 10)  # "an earlier checkpoint" of sv0
    z.adapters["lora0"] = perturbed_lora(z.llama, a / "lora0", 20)
    z.adapters["lora1"] = perturbed_lora(z.llama, a / "lora1", 21)
    z.adapters["full0"] = perturbed_full(z.llama, a / "full0", 30)
    z.adapters["merged0"] = merged_as_full(z.llama, z.adapters["sv0"], a / "merged0")
    z.adapters["clf"] = perturbed_svfit(z.bert, a / "clf", **CLF)
    return z


@dataclass
class Served:
    """A running app (TestClient) whose organization `alpha` owns every zoo adapter as a model, routing its
    inference to a serving replica on a thread of this process."""

    app: object
    client: TestClient
    settings: Settings
    keys: dict[str, str]
    model_ids: dict[str, str]  # zoo name -> served model id
    replica: ReplicaThread  # the serving replica the app routes to, in this process

    @property
    def engine(self):
        """The replica's inference engine (for tests that look inside it)."""
        return self.replica.app.state.inference

    def headers(self, org: str = "alpha") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[org]}"}

    def post(self, path: str, body: dict, org: str = "alpha"):
        return self.client.post(f"/v1{path}", json=body, headers=self.headers(org))


def model_id(name: str) -> str:
    if name == "sv0_ckpt":
        return f"{model_id('sv0')}:ckpt-step-5"
    return f"ft:{BERT if name == 'clf' else LLAMA}:org-alpha:{name}:job{name}"


def publish(app, org_id: str, zoo: Zoo, data_dir: Path) -> dict[str, str]:
    """Copy every adapter into the store and write the rows the worker writes when it publishes."""
    ids = {}
    with app.state.sessionmaker() as session:
        for name, folder in zoo.adapters.items():
            job_id = f"ftjob-{name.replace('_', '')}"
            base = BERT if name == "clf" else LLAMA
            if name != "sv0_ckpt":
                session.add(Job(id=job_id, org_id=org_id, model=base, training_file="file-x", seed=0,
                                hyperparameters={}, method={}, peft={}, status="succeeded"))
                session.flush()  # the model row's foreign key needs the job row first
            key = f"jobs/{job_id}/final" if name != "sv0_ckpt" else "jobs/ftjob-sv0/checkpoints/step-5"
            shutil.copytree(folder, app.state.storage.path(key))
            ids[name] = model_id(name)
            session.add(FineTunedModel(
                id=ids[name], org_id=org_id, parent=base, job_id="ftjob-sv0" if name == "sv0_ckpt" else job_id,
                step_number=5 if name == "sv0_ckpt" else None, storage_key=key,
            ))
            session.flush()
        session.commit()
    return ids


def make_settings(tmp: Path, zoo: Zoo, **overrides) -> Settings:
    values = dict(data_dir=tmp / "data", models_dir=zoo.models_dir, require_auth=True,
                  inference_batch_window_ms=2.0, serving_token="test-serving-token")
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, zoo: Zoo) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("served")
    settings = make_settings(tmp, zoo)
    app = create_app(settings, dispatch=lambda job_id: None, auto_migrate=True)
    keys = {}
    with app.state.sessionmaker() as session:
        org_ids = {}
        for org in ("alpha", "beta"):
            org_ids[org], keys[org] = create_api_key(session, org)
    ids = publish(app, org_ids["alpha"], zoo, settings.data_dir)
    with ReplicaThread(settings) as replica, TestClient(app, raise_server_exceptions=False) as client:
        yield Served(app, client, settings, keys, ids, replica)
    app.state.engine.dispose()
