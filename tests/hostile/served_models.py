"""Real (tiny) models for the suites that need inference to run: a random Llama with a 64-token context as
a base model, and a tiny BERT base with an SVFit classification fine-tune owned by one organization.

Built offline in a second or two (testkit/tiny_models.py); the fine-tune is an adapter saved the way
training saves one (weights + training_meta.json) and the rows the worker writes when it publishes.
"""

from __future__ import annotations

import json
from pathlib import Path

LLAMA = "tiny-llama"
BERT = "tiny-bert"
CONTEXT = 64  # tiny_models.MAX_POSITIONS
LABELS = ["neg", "pos"]


def build_models(root: Path) -> Path:
    """A models folder holding `tiny-llama` and `tiny-bert`."""
    from testkit.tiny_models import build_tiny

    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    build_tiny("llama", "causal", root).rename(models / LLAMA)
    build_tiny("bert", "classification", root).rename(models / BERT)
    return models


def publish_classifier(app, org_id: str, models_dir: Path, suffix: str = "clf",  # noqa: ANN001
                       text_pair: bool | None = None) -> str:
    """An SVFit classification fine-tune of tiny-bert, owned by `org_id`; returns its model id. `text_pair`:
    what its training_meta.json records it was trained on (pairs or single texts); None records nothing."""
    from api.core.tables import FineTunedModel, Job
    from svfit_core import SVFitConfig, inject_svfit, save_svfit_adapter
    from testkit.tiny_models import load_tiny

    job_id = f"ftjob-{suffix}"
    key = f"jobs/{job_id}/final"
    out = app.state.storage.path(key)
    svfit = inject_svfit(load_tiny(models_dir / BERT, "classification"), SVFitConfig(rank=4))
    save_svfit_adapter(svfit, out)
    meta = {"format_version": 1, "method": "svfit", "task": "classification", "label_names": LABELS}
    if text_pair is not None:
        meta["text_pair"] = text_pair
    (out / "training_meta.json").write_text(json.dumps(meta))
    model_id = f"ft:{BERT}:{org_id}:{suffix}:{job_id}"
    with app.state.sessionmaker() as session:
        hyperparameters = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0}
        session.add(Job(
            id=job_id, org_id=org_id, model=BERT, training_file="file-x", seed=0, hyperparameters=hyperparameters,
            method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            peft={"type": "svfit", "rank": 4}, status="succeeded", result_files=[],
        ))
        session.flush()  # the model row's foreign key needs the job first
        session.add(FineTunedModel(id=model_id, org_id=org_id, parent=BERT, job_id=job_id, storage_key=key))
        session.commit()
    return model_id
