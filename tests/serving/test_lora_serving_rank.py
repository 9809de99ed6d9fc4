"""A `peft_lora?rank=r′` artifact is what the engine serves at serving rank r′: the archive downloaded through
the API, loaded by HF PEFT, gives the logits of the engine's shared-base lane with `inference_serving_rank=r′`
(fp32), and both differ from the adapter at its full rank."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from serving.lanes import SharedBaseLane
from serving.scheduler import Scheduler
from serving.types import ModelRef
from api.main import create_app
from api.services.keys import create_api_key
from svfit_core import load_svfit_adapter
from testkit.tiny_models import load_tiny, sample_batch
from tests.serving.conftest import LLAMA, make_settings, publish

ATOL = 1e-4  # fp32


def serve_and_download(tmp: Path, zoo, name: str, rank: int) -> tuple[Path, float, Scheduler]:
    """Publish the zoo in an app serving at ``rank``; return the extracted `peft_lora?rank=` artifact of
    ``name``, its X-Kept-Energy, and a scheduler built from the same settings as the app's engine."""
    settings = make_settings(tmp, zoo, inference_serving_rank=rank)
    app = create_app(settings, dispatch=lambda job_id: None, auto_migrate=True)
    with app.state.sessionmaker() as session:
        org_id, key = create_api_key(session, "alpha")
    publish(app, org_id, zoo, settings.data_dir)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get(f"/v1/fine_tuning/jobs/ftjob-{name.replace('_', '')}/artifacts",
                              params={"format": "peft_lora", "rank": rank}, headers={"Authorization": f"Bearer {key}"})
    app.state.engine.dispose()
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        tar.extractall(tmp / "artifact", filter="data")
    (folder,) = (tmp / "artifact").iterdir()
    return folder, float(response.headers["x-kept-energy"]), Scheduler(settings)


@pytest.mark.parametrize(("name", "rank"), [("sv2", 4), ("sv_qv", 8)], ids=["all-linear-r16-at-4", "qv-rk-at-8"])
@torch.no_grad()
def test_peft_lora_at_a_rank_equals_the_engine_at_that_serving_rank(zoo, tmp_path, name, rank):
    from peft import PeftModel

    folder, kept_energy, scheduler = serve_and_download(tmp_path, zoo, name, rank)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == rank
    assert json.loads((folder / "manifest.json").read_text())["rank"] == rank
    assert 0 < kept_energy < 1

    ref = ModelRef(model_id=name, base_id=LLAMA, base_path=zoo.llama, adapter_dir=zoo.adapters[name], method="svfit")
    lane = scheduler.lane_for(ref)
    assert isinstance(lane, SharedBaseLane) and lane.serving_rank == rank
    assert next(lane.model.parameters()).dtype == torch.float32
    batch = sample_batch(3, 9, seed=4)
    served = lane.forward([lane.tag_for(ref)] * 3, **batch)

    peft_logits = PeftModel.from_pretrained(load_tiny(zoo.llama, "causal"), folder).eval()(**batch).logits
    assert (peft_logits - served).abs().max() <= ATOL
    # The cut is real: at its full rank the adapter answers otherwise.
    full = load_svfit_adapter(load_tiny(zoo.llama, "causal"), zoo.adapters[name]).eval()(**batch).logits
    assert (full - served).abs().max() > 1e-2
