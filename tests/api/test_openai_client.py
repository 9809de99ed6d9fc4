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


def test_graders_through_the_openai_client(api: Api, served: str):
    """`client.fine_tuning.alpha.graders.validate` / `.run` unchanged, a text grader and a multi grader (in the
    openai types' one-grader spelling and in OpenAI's map of graders); a refusal is a BadRequestError."""
    client = openai.OpenAI(base_url=served, api_key=api.keys["alpha"], max_retries=0)
    graders = client.fine_tuning.alpha.graders
    exact = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "operation": "eq"}

    assert graders.validate(grader=exact).grader.type == "string_check"
    run = graders.run(grader=exact, model_sample="Paris", item={"answer": "Paris"})
    assert run.reward == 1.0 and run.metadata.name == "exact" and run.metadata.errors.invalid_variable_error is False

    one = {"type": "multi", "name": "m", "graders": exact, "calculate_output": "2 * exact"}
    assert graders.validate(grader=one).grader.type == "multi"
    assert graders.run(grader=one, model_sample="Paris", item={"answer": "Paris"}).reward == 2.0
    similar = {"type": "text_similarity", "name": "similar", "input": "{{sample.output_text}}",
               "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}
    both = {"type": "multi", "name": "m", "graders": {"exact": exact, "similar": similar},
            "calculate_output": "(exact + similar) / 2"}
    run = graders.run(grader=both, model_sample="Parus", item={"answer": "Paris"})
    assert run.sub_rewards["exact"] == 0.0 and 0.5 < run.sub_rewards["similar"] < 1.0
    assert run.reward == pytest.approx(run.sub_rewards["similar"] / 2)

    with pytest.raises(openai.BadRequestError) as python:
        graders.validate(grader={"type": "python", "name": "p", "source": "def grade(s, i): return 1"})
    assert (python.value.param, python.value.code) == ("grader.type", "grader_not_supported")
