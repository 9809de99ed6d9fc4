"""What a job produces, read through the API: events, checkpoints (rows as the worker writes them), and
artifact archives built by the training library from a real (tiny, one-step) training run."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from sqlalchemy import update

from api.core.ids import new_id
from api.core.tables import Checkpoint, FineTunedModel, Job, JobEvent
from tests.api.conftest import BASE_MODEL, chat_line


def _events(api, job_id: str, n: int) -> list[str]:
    ids = [new_id("ftevent") for _ in range(n)]
    api.add(*[
        JobEvent(id=event_id, job_id=job_id, level="info", type="metrics", message=f"step {i}", data={"step": i, "train_loss": 1.0 / (i + 1)})
        for i, event_id in enumerate(ids)
    ])
    return ids


def test_events_newest_first_with_cursor(any_db_api):
    api = any_db_api
    job_id = api.job_ok()["id"]
    created_event = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=api.headers()).json()["data"]
    assert [e["message"] for e in created_event] == [f"Created fine-tuning job: {job_id}"]
    ids = _events(api, job_id, 5)
    page = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 3}, headers=api.headers()).json()
    assert [e["id"] for e in page["data"]] == ids[::-1][:3] and page["has_more"] is True
    event = page["data"][0]
    assert event["object"] == "fine_tuning.job.event" and event["type"] == "metrics" and event["level"] == "info"
    assert event["data"] == {"step": 4, "train_loss": 0.2}
    rest = api.client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": page["last_id"]}, headers=api.headers()
    ).json()
    assert [e["id"] for e in rest["data"]][:2] == ids[::-1][3:] and rest["has_more"] is False


def _checkpoint(job_id: str, org_id: str, step: int, storage_key: str | None = None) -> Checkpoint:
    return Checkpoint(
        id=new_id("ftckpt"),
        job_id=job_id,
        org_id=org_id,
        step_number=step,
        metrics={"step": step, "train_loss": 0.5},
        fine_tuned_model_checkpoint=f"ft:{BASE_MODEL}:{org_id}::{job_id[-12:]}:ckpt-step-{step}",
        storage_key=storage_key or f"jobs/{job_id}/checkpoints/step-{step}",
    )


def test_checkpoints_newest_first_with_cursor(any_db_api):
    api = any_db_api
    job_id = api.job_ok()["id"]
    org_id = api.org_ids["alpha"]
    api.add(*[_checkpoint(job_id, org_id, step) for step in (5, 10, 15)])
    page = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 2}, headers=api.headers()).json()
    assert [c["step_number"] for c in page["data"]] == [15, 10] and page["has_more"] is True
    checkpoint = page["data"][0]
    assert checkpoint["object"] == "fine_tuning.job.checkpoint" and checkpoint["fine_tuning_job_id"] == job_id
    assert checkpoint["fine_tuned_model_checkpoint"].endswith(":ckpt-step-15")
    assert checkpoint["metrics"] == {"step": 15, "train_loss": 0.5}
    rest = api.client.get(
        f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"after": page["last_id"]}, headers=api.headers()
    ).json()
    assert [c["step_number"] for c in rest["data"]] == [5] and rest["has_more"] is False


def test_artifacts_of_an_unfinished_job_are_unavailable(api):
    job_id = api.job_ok()["id"]
    url = f"/v1/fine_tuning/jobs/{job_id}/artifacts"
    response = api.client.get(url, headers=api.headers())
    assert response.status_code == 400 and response.json()["error"]["code"] == "artifact_unavailable"
    response = api.client.get(url, params={"step": 7}, headers=api.headers())
    assert response.status_code == 400 and response.json()["error"]["param"] == "step"
    response = api.client.get(url, params={"format": "onnx"}, headers=api.headers())
    assert response.status_code == 400 and response.json()["error"]["param"] == "format"


# --- real archives --------------------------------------------------------------------------------------


def _train_one_step(base: Path, out: Path, method: str, bases_dir: Path | None = None) -> Path:
    from svfit_core.bases import DirectoryBasisStore
    from svfit_core.training import PeftSpec, TrainConfig, run_training

    examples = [chat_line(i) for i in range(4)]
    result = run_training(
        base, examples, None, PeftSpec(method=method, rank=2),
        TrainConfig(n_epochs=1, batch_size=2, max_seq_length=16, max_steps=1, seed=0, device="cpu"), out,
        bases=DirectoryBasisStore(bases_dir) if bases_dir is not None else None,
    )
    assert result.ended_by == "completion" and result.adapter_dir is not None
    return result.adapter_dir


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Llama and one-step svfit and lora adapters trained on it (a few seconds, once)."""
    pytest.importorskip("svfit_core.training.outputs")
    from testkit.tiny_models import build_tiny

    root = tmp_path_factory.mktemp("trained")
    models_dir = root / "models"
    models_dir.mkdir()
    base = build_tiny("llama", "causal", root)
    (models_dir / BASE_MODEL).symlink_to(base, target_is_directory=True)
    return {
        "models_dir": models_dir,
        "svfit": _train_one_step(base, root / "run-svfit", "svfit"),
        "lora": _train_one_step(base, root / "run-lora", "lora"),
        # As the worker trains: bases in the store, σ and their keys in the adapter.
        "compact": _train_one_step(base, root / "run-compact", "svfit", bases_dir=root / "bases"),
        "bases": root / "bases",
        "base": base,
    }


def _publish(api, adapter_dir: Path, *, peft_type: str, checkpoint_step: int | None = None) -> str:
    """A succeeded job whose adapter lies in the store where the worker publishes it."""
    import shutil

    job_id = api.job_ok(peft={"type": peft_type})["id"]
    org_id = api.org_ids["alpha"]
    key = f"jobs/{job_id}/final"
    shutil.copytree(adapter_dir, api.app.state.storage.path(key))
    rows = [FineTunedModel(id=f"ft:{BASE_MODEL}:{org_id}::{job_id[-12:]}", org_id=org_id, parent=BASE_MODEL, job_id=job_id, storage_key=key)]
    if checkpoint_step is not None:
        rows.append(_checkpoint(job_id, org_id, checkpoint_step, storage_key=key))
    api.add(*rows)
    with api.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="succeeded"))
        session.commit()
    return job_id


def _members(archive: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return tar.getnames()


def test_artifact_archives_are_built_once_with_their_sha256(make_api, trained, monkeypatch):
    api = make_api(models_dir=trained["models_dir"])
    job_id = _publish(api, trained["svfit"], peft_type="svfit", checkpoint_step=1)
    url = f"/v1/fine_tuning/jobs/{job_id}/artifacts"

    response = api.client.get(url, params={"format": "svfit"}, headers=api.headers())
    assert response.status_code == 200, response.text
    assert response.headers["x-content-sha256"] == hashlib.sha256(response.content).hexdigest()
    assert response.headers["content-disposition"] == f'attachment; filename="{job_id}-final-svfit.tar.gz"'
    names = _members(response.content)
    assert f"{job_id}-final-svfit/adapter_config.json" in names
    assert f"{job_id}-final-svfit/adapter_model.safetensors" in names

    # Cached: a second request is served from the store without exporting again.
    import svfit_core.training.outputs

    def no_rebuild(*_args, **_kwargs):
        raise AssertionError("rebuilt a cached artifact")

    monkeypatch.setattr(svfit_core.training.outputs, "write_artifact", no_rebuild)
    again = api.client.get(url, params={"format": "svfit"}, headers=api.headers())
    assert again.content == response.content and again.headers["x-content-sha256"] == response.headers["x-content-sha256"]
    monkeypatch.undo()

    lora = api.client.get(url, params={"format": "peft_lora", "step": 1}, headers=api.headers())
    assert lora.status_code == 200, lora.text
    assert lora.headers["x-content-sha256"] == hashlib.sha256(lora.content).hexdigest()
    assert f"{job_id}-step-1-peft_lora-r256/adapter_config.json" in _members(lora.content)
    leftovers = [p.name for p in api.app.state.storage.path(f"artifacts/{job_id}").iterdir() if p.name.startswith(".build")]
    assert leftovers == []


def _adapter_tensor_names(archive: bytes) -> set[str]:
    from safetensors.torch import load

    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/adapter_model.safetensors"))
        return set(load(tar.extractfile(member).read()))


def test_svfit_artifact_names_its_bases_unless_asked_to_include_them(make_api, trained):
    import shutil

    import torch

    from svfit_core import load_svfit_adapter
    from testkit.tiny_models import load_tiny, sample_batch

    api = make_api(models_dir=trained["models_dir"])
    shutil.copytree(trained["bases"], api.app.state.storage.path("bases"))  # where the worker keeps them
    job_id = _publish(api, trained["compact"], peft_type="svfit")
    url = f"/v1/fine_tuning/jobs/{job_id}/artifacts"

    compact = api.client.get(url, params={"format": "svfit"}, headers=api.headers())
    assert compact.status_code == 200, compact.text
    assert _adapter_tensor_names(compact.content) and all(
        name.endswith(".sigma") for name in _adapter_tensor_names(compact.content)
    )
    full = api.client.get(url, params={"format": "svfit", "include_basis": "true"}, headers=api.headers())
    assert full.status_code == 200, full.text
    assert full.headers["content-disposition"] == f'attachment; filename="{job_id}-final-svfit-with-bases.tar.gz"'
    assert any(name.endswith(".U") for name in _adapter_tensor_names(full.content))

    # The self-contained adapter loads with no basis store and computes what the trained one does.
    folder = Path(api.app.state.storage.path("unpacked"))
    with tarfile.open(fileobj=io.BytesIO(full.content), mode="r:gz") as tar:
        tar.extractall(folder, filter="data")
    batch = sample_batch(batch=2, seq=8, seed=0)
    with torch.no_grad():
        unpacked = load_svfit_adapter(load_tiny(trained["base"], "causal"), folder / f"{job_id}-final-svfit-with-bases")
        trained_model = load_svfit_adapter(load_tiny(trained["base"], "causal"), trained["compact"])
        # The trained adapter's bases recomputed by SVD here: equal up to the SVD's rounding.
        assert (unpacked(**batch).logits - trained_model(**batch).logits).abs().max() < 1e-5

    wrong = api.client.get(url, params={"format": "merged", "include_basis": "true"}, headers=api.headers())
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "include_basis"


def _manifest(archive: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/manifest.json"))
        return json.loads(tar.extractfile(member).read())


@pytest.mark.parametrize("peft_type", ["svfit", "lora"])
def test_peft_lora_comes_at_the_serving_rank_by_default_with_its_kept_energy(make_api, trained, peft_type):
    api = make_api(models_dir=trained["models_dir"])
    job_id = _publish(api, trained[peft_type], peft_type=peft_type)
    response = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts", params={"format": "peft_lora"},
                              headers=api.headers())
    assert response.status_code == 200, response.text
    assert response.headers["content-disposition"] == f'attachment; filename="{job_id}-final-peft_lora-r256.tar.gz"'
    manifest = _manifest(response.content)
    assert manifest["format"] == "peft_lora" and manifest["rank"] == 256
    assert manifest["kept_energy"] == 1.0  # both adapters have rank 2: nothing to cut
    assert response.headers["x-kept-energy"] == "1.0000"
    assert f"{job_id}-final-peft_lora-r256/kept_energy.json" in _members(response.content)
    for fmt in ("svfit", "merged") if peft_type == "svfit" else ("merged",):
        other = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts", params={"format": fmt}, headers=api.headers())
        assert other.status_code == 200 and "x-kept-energy" not in other.headers
        assert "rank" not in _manifest(other.content)


@pytest.mark.parametrize(
    "params",
    [{"format": "peft_lora", "rank": 0}, {"format": "peft_lora", "rank": 513}, {"format": "peft_lora", "rank": -4},
     {"format": "peft_lora", "rank": "abc"}, {"format": "peft_lora", "rank": 1.5}, {"format": "svfit", "rank": 8},
     {"format": "merged", "rank": 64}, {"rank": 64}],
    ids=["zero", "above-512", "negative", "not-a-number", "fraction", "svfit", "merged", "default-format"],
)
def test_a_bad_or_misplaced_rank_is_a_400_naming_rank(make_api, trained, params):
    api = make_api(models_dir=trained["models_dir"])
    job_id = _publish(api, trained["svfit"], peft_type="svfit")
    response = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts", params=params, headers=api.headers())
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "rank" and error["type"] == "invalid_request_error" and error["code"] == "invalid_parameter"
    assert not api.app.state.storage.path(f"artifacts/{job_id}").exists()  # refused before anything was built


def test_peft_lora_archives_are_cached_per_rank(make_api, trained, monkeypatch):
    api = make_api(models_dir=trained["models_dir"])
    job_id = _publish(api, trained["svfit"], peft_type="svfit")
    url = f"/v1/fine_tuning/jobs/{job_id}/artifacts"
    cut = api.client.get(url, params={"format": "peft_lora", "rank": 1}, headers=api.headers())
    whole = api.client.get(url, params={"format": "peft_lora", "rank": 2}, headers=api.headers())
    assert cut.status_code == whole.status_code == 200
    assert cut.headers["x-content-sha256"] != whole.headers["x-content-sha256"]
    assert cut.headers["content-disposition"].endswith('-peft_lora-r1.tar.gz"')
    assert 0 < float(cut.headers["x-kept-energy"]) < 1 and whole.headers["x-kept-energy"] == "1.0000"
    assert _manifest(cut.content)["kept_energy"] == pytest.approx(float(cut.headers["x-kept-energy"]), abs=5e-5)

    import svfit_core.training.outputs

    def no_rebuild(*_args, **_kwargs):
        raise AssertionError("rebuilt a cached artifact")

    monkeypatch.setattr(svfit_core.training.outputs, "write_artifact", no_rebuild)
    for rank, first in ((1, cut), (2, whole)):
        again = api.client.get(url, params={"format": "peft_lora", "rank": rank}, headers=api.headers())
        assert again.content == first.content
        assert again.headers["x-kept-energy"] == first.headers["x-kept-energy"]
    uncached = api.client.get(url, params={"format": "peft_lora", "rank": 3}, headers=api.headers())
    assert uncached.status_code == 500  # a rank not built yet is built, not served from another rank's archive


def test_svfit_format_of_a_lora_job_is_unavailable(make_api, trained):
    api = make_api(models_dir=trained["models_dir"])
    job_id = _publish(api, trained["lora"], peft_type="lora")
    response = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts", params={"format": "svfit"}, headers=api.headers())
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "artifact_unavailable" and response.json()["error"]["param"] == "format"
    assert not api.app.state.storage.path(f"artifacts/{job_id}/{job_id}-final-svfit.tar.gz").exists()
