"""The official `openai` client against the app served by uvicorn on a free port: what users will run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from api.core.ids import new_id
from api.core.tables import Checkpoint, JobEvent
from tests.api.conftest import Api, chat_file
from tests.network import uvicorn_in_thread

openai = pytest.importorskip("openai")


@pytest.fixture
def served(api: Api) -> Iterator[str]:
    with uvicorn_in_thread(api.app) as port:
        yield f"http://127.0.0.1:{port}/v1"


def test_files_and_jobs_through_the_openai_client(api: Api, served: str):
    client = openai.OpenAI(base_url=served, api_key=api.keys["alpha"], max_retries=0)
    body = chat_file(5)

    uploaded = client.files.create(file=("train.jsonl", body), purpose="fine-tune")
    assert uploaded.status == "processed" and uploaded.bytes == len(body)
    assert [f.id for f in client.files.list()] == [uploaded.id]
    assert client.files.retrieve(uploaded.id).filename == "train.jsonl"
    assert client.files.content(uploaded.id).read() == body

    job = client.fine_tuning.jobs.create(
        model="tiny-base",
        training_file=uploaded.id,
        hyperparameters={"n_epochs": 2},
        suffix="demo",
        metadata={"team": "nlp & search"},
        extra_body={"peft": {"type": "svfit", "rank": 4}},
    )
    assert job.status == "queued" and job.hyperparameters.n_epochs == 2
    assert job.peft == {"type": "svfit", "rank": 4, "energy": None, "target_modules": "all-linear"}  # extension kept
    assert api.dispatch.job_ids == [job.id]
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "nlp & search"})] == [job.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "nlp"})] == []
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id

    api.add(JobEvent(id=new_id("ftevent"), job_id=job.id, level="info", type="metrics", message="step 1", data={"step": 1}))
    api.add(Checkpoint(
        id=new_id("ftckpt"), job_id=job.id, org_id=api.org_ids["alpha"], step_number=1, metrics={"step": 1},
        fine_tuned_model_checkpoint=f"ft:tiny-base:x:demo:{job.id[-12:]}:ckpt-step-1", storage_key="k",
    ))
    events = list(client.fine_tuning.jobs.list_events(job.id))  # auto-pagination ends on has_more=false
    assert [e.message for e in events] == ["step 1", f"Created fine-tuning job: {job.id}"]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in checkpoints] == [1]

    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as finished:
        client.fine_tuning.jobs.cancel(job.id)
    assert finished.value.code == "invalid_state"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-missing")
    with pytest.raises(openai.BadRequestError) as bad_model:
        client.fine_tuning.jobs.create(model="nope", training_file=uploaded.id)
    assert bad_model.value.param == "model"

    assert client.files.delete(uploaded.id).deleted is True
    assert list(client.files.list()) == []
