"""`svfit` client commands as subprocesses against a real `svfit serve`: upload → create → follow →
download (checked against the server's sha256), pause / resume / cancel, the key's three sources, chat,
classify, and the exit codes and `error: <code>: ...` lines scripts rely on."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from tests.svfit_cli.conftest import ROOT, SVFIT, Run, client_env
from tests.client_harness import cancel_unfinished
from tests.e2e.conftest import CHAT_LINES, Service

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHORT_JOB = ["--model", "tiny-llama", "--epochs", "2", "--batch-size", "2", "--peft-option", "checkpoint_every=4"]


@pytest.fixture(scope="module")
def long_jsonl(tmp_path_factory) -> Path:
    """Enough examples (320, 50 epochs at batch 1) that a job is still running when a test acts on it."""
    path = tmp_path_factory.mktemp("datasets") / "long.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in CHAT_LINES * 40))
    return path


def wait_status(svfit: Run, job_id: str, statuses: set[str], timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = svfit("jobs", "get", job_id, "--json").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"{job_id} still {job['status']}"
        time.sleep(0.5)


def test_upload_create_follow_and_download_verified_artifacts(svfit: Run, chat_jsonl: Path, tmp_path: Path,
                                                               service: Service):
    uploaded = svfit("files", "upload", str(chat_jsonl))
    assert uploaded.returncode == 0, uploaded.stderr
    file_id = uploaded.stdout.strip()
    assert file_id.startswith("file-")
    assert "100%" in uploaded.stderr and "processed" in uploaded.stderr  # the byte progress bar, then the status

    created = svfit("jobs", "create", "--training-file", file_id, "--suffix", "cli", *SHORT_JOB)
    assert created.returncode == 0, created.stderr
    job_id = created.stdout.strip()
    assert job_id.startswith("ftjob-")

    followed = svfit("jobs", "follow", job_id, "--interval", "0.3")
    assert followed.returncode == 0, followed.stderr
    model = followed.stdout.strip()
    assert model.startswith("ft:tiny-llama:") and ":cli:" in model
    assert "16/16 100%" in followed.stderr and "loss " in followed.stderr and "succeeded" in followed.stderr
    assert svfit("jobs", "get", job_id, "--json").json()["fine_tuned_model"] == model

    downloaded = svfit("artifacts", "download", job_id, "--format", "peft_lora", "-o", str(tmp_path), "--json")
    assert downloaded.returncode == 0, downloaded.stderr
    result = downloaded.json()
    archive = Path(result["path"])
    assert archive.parent == tmp_path and archive.exists() and not list(tmp_path.glob("*.part"))
    assert result["verified"] and result["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    served = httpx.get(f"{service.base_url}/v1/fine_tuning/jobs/{job_id}/artifacts",
                       params={"format": "peft_lora"}, timeout=120)
    assert served.headers["x-content-sha256"] == result["sha256"]
    with tarfile.open(archive) as tar:
        assert any(name.endswith("adapter_model.safetensors") for name in tar.getnames())

    # A checkpoint's native adapter (the end of epoch 1; retention deleted the earlier step ones), to an
    # explicit file name, with the path as the only stdout line.
    step = svfit("artifacts", "download", job_id, "--format", "svfit", "--step", "8", "-o", "ckpt8.tar.gz", cwd=tmp_path)
    assert step.returncode == 0, step.stderr
    assert step.stdout.strip() == "ckpt8.tar.gz" and (tmp_path / "ckpt8.tar.gz").stat().st_size > 0


def test_one_command_from_a_local_file_to_a_model(svfit: Run, chat_jsonl: Path):
    """`--training-file PATH` uploads first; `--follow` ends with the model id; `--json` gives the job."""
    result = svfit("jobs", "create", "--training-file", str(chat_jsonl), *SHORT_JOB, "--follow", "--interval", "0.3",
                   "--json")
    assert result.returncode == 0, result.stderr
    job = result.json()
    assert job["status"] == "succeeded" and job["fine_tuned_model"]
    assert "upload train.jsonl" in result.stderr and "100%" in result.stderr  # progress stays off stdout


def test_a_dpo_job_from_the_command_line(svfit: Run, tmp_path: Path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "input": {"messages": line["messages"][:1]},
        "preferred_output": line["messages"][1:],
        "non_preferred_output": [{"role": "assistant", "content": "no ."}],
    }) + "\n" for line in CHAT_LINES))

    wrong = svfit("jobs", "create", "--model", "tiny-llama", "--training-file", str(pairs), "--beta", "0.2")
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: invalid_parameter: --beta applies only to")

    created = svfit("jobs", "create", "--model", "tiny-llama", "--training-file", str(pairs), "--method", "dpo",
                    "--beta", "0.2", "--epochs", "1", "--batch-size", "4", "--follow", "--interval", "0.3")
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip().startswith("ft:tiny-llama:")
    assert "(dpo/svfit, beta 0.2)" in created.stderr
    [job] = [j for j in svfit("jobs", "list", "--json").json() if j["fine_tuned_model"] == created.stdout.strip()]
    assert job["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0, "beta": 0.2}}}
    shown = svfit("jobs", "get", job["id"])
    assert shown.returncode == 0 and "dpo/svfit" in shown.stdout and '"beta": 0.2' in shown.stdout


def test_errors_exit_non_zero_with_the_api_error_code(svfit: Run, tmp_path: Path, chat_jsonl: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\nnot json\n')
    upload = svfit("files", "upload", str(bad))
    assert upload.returncode == 1
    bad_id = upload.stdout.strip()
    assert bad_id.startswith("file-")  # stored (the report is kept), but unusable
    assert "error: invalid_training_file:" in upload.stderr and "line 2:" in upload.stderr

    refused = svfit("jobs", "create", "--model", "tiny-llama", "--training-file", bad_id)
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr.startswith("error: invalid_training_file: ")

    unknown = svfit("jobs", "get", "ftjob-nope")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: not_found: ")

    no_model = svfit("jobs", "create", "--model", "no-such-model", "--training-file", str(chat_jsonl))
    assert no_model.returncode == 1 and "error: model_not_found: " in no_model.stderr

    unreachable = svfit("files", "list", "--api-base", "http://127.0.0.1:9/v1")
    assert unreachable.returncode == 3 and unreachable.stderr.startswith("error: api_unreachable: ")

    usage = svfit("artifacts", "download", "ftjob-x", "--format", "onnx")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr

    listed = svfit("files", "get", bad_id, "--json").json()
    assert listed["status"] == "error"
    deleted = svfit("files", "delete", bad_id)
    assert deleted.returncode == 0 and deleted.stdout.strip() == f"deleted {bad_id}"
    assert svfit("files", "get", bad_id).returncode == 1


def test_pause_resume_cancel_and_a_followed_cancel_exits_4(svfit: Run, long_jsonl: Path, service: Service,
                                                           tmp_path: Path):
    created = svfit("jobs", "create", "--model", "tiny-llama", "--training-file", str(long_jsonl), "--epochs", "50",
                    "--batch-size", "1", "--peft-option", "checkpoint_every=100000", "--metadata", "team=cli 1",
                    "--json")
    assert created.returncode == 0, created.stderr
    job_id = created.json()["id"]
    try:
        assert [j["id"] for j in svfit("jobs", "list", "--metadata", "team=cli 1", "--json").json()] == [job_id]
        assert svfit("jobs", "list", "--metadata", "team=cli", "--json").json() == []
        pause_resume_and_cancel_while_following(svfit, job_id, service, tmp_path)
    finally:
        cancel_unfinished(service, job_id)


def pause_resume_and_cancel_while_following(svfit: Run, job_id: str, service: Service, tmp_path: Path) -> None:
    wait_status(svfit, job_id, {"running"})

    paused = svfit("jobs", "pause", job_id)
    assert paused.returncode == 0 and paused.stdout.startswith(job_id)
    wait_status(svfit, job_id, {"paused"})
    assert svfit("jobs", "resume", job_id).returncode == 0
    wait_status(svfit, job_id, {"running", "queued"})

    listed = svfit("jobs", "list", "--status", "running")
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].split() == [
        "ID", "STATUS", "METHOD", "PROGRESS", "CREATED", "MODEL"]

    follower = subprocess.Popen(
        [*SVFIT, "jobs", "follow", job_id, "--interval", "0.3"], cwd=ROOT,
        env=client_env(service, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.5)
        cancelled = svfit("jobs", "cancel", job_id)
        assert cancelled.returncode == 0, cancelled.stderr
        out, err = follower.communicate(timeout=120)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 4, err
    assert out == "" and "error: job_cancelled: " in err
    assert " running " in err and "cancelled" in err  # the bar saw it run, then end

    again = svfit("jobs", "cancel", job_id)
    assert again.returncode == 1 and again.stderr.startswith("error: invalid_state: ")


def test_the_key_comes_from_the_flag_then_the_environment_then_the_config_file(svfit: Run, service: Service):
    out = subprocess.run([*SVFIT, "keys", "create", "--org", "cli-test"], cwd=ROOT, env=service.env,
                         check=True, capture_output=True, text=True).stdout
    key = next(token for token in out.split() if token.startswith("sk-"))
    config = svfit.home / ".config" / "svfit" / "config.json"  # type: ignore[attr-defined]
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"api_key": key}))

    # The new organization's view: no jobs at all, unlike the default organization.
    assert svfit("jobs", "list", "--json").json() == []
    assert svfit("jobs", "list", "--json", env={"SVFIT_API_KEY": ""}).json() == []  # empty: fall through
    wrong = svfit("jobs", "list", env={"SVFIT_API_KEY": "sk-svfit-wrong"})
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: invalid_api_key: ")
    flag = svfit("jobs", "list", "--json", "--api-key", key, env={"SVFIT_API_KEY": "sk-svfit-wrong"})
    assert flag.returncode == 0 and flag.json() == []

    config.write_text("{not json")
    broken = svfit("jobs", "list")
    assert broken.returncode == 1 and broken.stderr.startswith("error: invalid_config: ")


def test_chat_one_turn_streams_the_reply(svfit: Run):
    streamed = svfit("chat", "tiny-llama", "--message", "what is good ?", "--max-tokens", "5", "--seed", "1")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip()
    whole = svfit("chat", "tiny-llama", "-m", "hello", "--max-tokens", "3", "--json")
    assert whole.returncode == 0, whole.stderr
    assert whole.json()["object"] == "chat.completion"
    missing = svfit("chat", "no-such-model", "-m", "hello")
    assert missing.returncode == 1 and "error: model_not_found: " in missing.stderr
    tools = '[{"type": "function", "function": {"name": "f"}}]'  # short: tiny-llama reads 64 tokens
    with_tools = svfit("chat", "tiny-llama", "-m", "hi", "--tools", tools, "--max-tokens", "2")
    assert with_tools.returncode == 0, with_tools.stderr
    # Its word-level tokenizer cannot be held to a grammar: the service's 400 names the field.
    json_mode = svfit("chat", "tiny-llama", "-m", "hi", "--response-format", "json_object")
    assert json_mode.returncode == 1 and "response_format" in json_mode.stderr, json_mode.stderr


def test_classify_sends_a_text_pair_the_service_reads(svfit: Run):
    # The service serves no classifier here: the pair passes the replica's input checks and the refusal is
    # about the model, not the input.
    refused = svfit("classify", "tiny-llama", "a man sleeps", "--text-pair", "a person rests")
    assert refused.returncode == 1 and "error: invalid_model: " in refused.stderr, refused.stderr
    empty_pair = svfit("classify", "tiny-llama", "a man sleeps", "--text-pair", "")  # still a pair, and valid
    assert empty_pair.returncode == 1 and "error: invalid_model: " in empty_pair.stderr, empty_pair.stderr


def test_graders_validate_and_run_against_the_service(svfit: Run, tmp_path: Path):
    exact = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "operation": "eq"}
    judge = {"type": "score_model", "name": "judge", "model": "tiny-llama",
             "input": [{"role": "user", "content": "Score {{sample.output_text}} from 0 to 1."}],
             "sampling_params": {"max_completions_tokens": 5, "temperature": 0}}
    files = {}
    for name, grader in {"exact": exact, "both": {"type": "multi", "name": "both", "calculate_output": "judge + exact",
                                                  "graders": {"judge": judge, "exact": exact}},
                         "python": {"type": "python", "name": "p", "source": "def grade(s, i): return 1"},
                         "unknown": {**judge, "model": "no-such-model"}}.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(grader))

    valid = svfit("graders", "validate", str(files["exact"]))
    assert valid.returncode == 0 and valid.stdout == "valid: string_check grader 'exact'\n", valid.stderr
    right = svfit("graders", "run", str(files["exact"]), "--sample", "Paris", "--item", '{"answer": "Paris"}', "--json")
    assert right.returncode == 0 and right.json()["reward"] == 1.0, right.stderr

    both = svfit("graders", "run", str(files["both"]), "--sample", "4", "--item", '{"answer": "4"}')
    assert both.returncode == 0, both.stderr
    lines = both.stdout.splitlines()
    assert lines[0].startswith("reward: ") and lines[1] == "grader: both (multi)"
    assert lines[2].startswith("models: tiny-llama (") and "exact       1" in both.stdout

    refused = svfit("graders", "validate", str(files["python"]))
    assert refused.returncode == 1 and refused.stderr.startswith("error: grader_not_supported: ")
    assert "(grader.type)" in refused.stderr
    unknown = svfit("graders", "run", str(files["unknown"]), "--sample", "4")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: model_not_found: ")
    assert unknown.stderr.rstrip().endswith("(grader.model)"), unknown.stderr
