"""The client CLI's pieces in-process, no server: where settings come from, the progress bar in a log, the
event reader's paging, and a download whose bytes do not match the announced sha256."""

from __future__ import annotations

import argparse
import io
import json

import httpx
import pytest

from svfit_cli.client import artifacts, base
from svfit_cli.client.http import ApiClient
from svfit_cli.client.jobs import EventReader, _method, _method_note, job_body
from svfit_cli.client.progress import ProgressBar


def args(**values) -> argparse.Namespace:  # noqa: ANN003
    return argparse.Namespace(**{"api_base": None, "api_key": None, **values})


def test_settings_come_from_flag_then_environment_then_config_file_then_default(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("SVFIT_API_BASE", raising=False)
    monkeypatch.delenv("SVFIT_API_KEY", raising=False)
    assert base.resolve_config(args()) == base.ClientConfig(base.DEFAULT_API_BASE, None)

    (tmp_path / "svfit").mkdir()
    (tmp_path / "svfit" / "config.json").write_text(json.dumps({"api_base": "http://file/v1/", "api_key": "k-file"}))
    assert base.resolve_config(args()) == base.ClientConfig("http://file/v1", "k-file")
    monkeypatch.setenv("SVFIT_API_KEY", "k-env")
    monkeypatch.setenv("SVFIT_API_BASE", "http://env/v1")
    assert base.resolve_config(args()) == base.ClientConfig("http://env/v1", "k-env")
    assert base.resolve_config(args(api_key="k-flag", api_base="http://flag/v1")) == base.ClientConfig(
        "http://flag/v1", "k-flag")


def test_the_progress_bar_writes_a_few_whole_lines_when_not_on_a_terminal():
    out = io.StringIO()
    bar = ProgressBar("upload", total=100, stream=out)
    for done in range(0, 101):
        bar.update(done)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 3 <= len(lines) <= 6, lines  # a line per quarter, not per update, and no repeated last line
    assert lines[-1].endswith("100/100 100%")


def events_api(pages: list[list[str]]) -> httpx.MockTransport:
    """An events endpoint serving ids newest first, `pages[i]` being what exists at the i-th poll."""
    polls = {"n": -1}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("after") is None:
            polls["n"] += 1
        ids = pages[min(polls["n"], len(pages) - 1)]
        after = request.url.params.get("after")
        start = ids.index(after) + 1 if after else 0
        limit = int(request.url.params["limit"])
        chunk = ids[start:start + limit]
        data = [{"id": i, "type": "message", "level": "info", "message": i, "created_at": 0, "data": None} for i in chunk]
        return httpx.Response(200, json={"object": "list", "data": data, "has_more": start + limit < len(ids)})

    return httpx.MockTransport(handler)


def test_the_event_reader_returns_only_new_events_oldest_first_across_pages():
    first = [f"e{i}" for i in range(150, 0, -1)]  # newest first, like the API
    second = [f"e{i}" for i in range(400, 0, -1)]  # 250 more: more than two pages behind
    client = ApiClient("http://test/v1", None, transport=events_api([first, second]))
    reader = EventReader(client, "ftjob-x")
    assert [e["id"] for e in reader.new_events()] == [f"e{i}" for i in range(51, 151)]  # the latest page only
    assert [e["id"] for e in reader.new_events()] == [f"e{i}" for i in range(151, 401)]
    assert reader.new_events() == []


def test_a_download_that_does_not_match_its_sha256_is_refused_and_removed(tmp_path):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"not what was promised", headers={
            "x-content-sha256": "0" * 64, "content-disposition": 'attachment; filename="../../escape.tar.gz"'})

    client = ApiClient("http://test/v1", None, transport=httpx.MockTransport(handler))
    with pytest.raises(base.CliError) as refused:
        artifacts.download(client, "ftjob-x", "svfit", None, str(tmp_path))
    assert refused.value.code == "checksum_mismatch"
    assert list(tmp_path.iterdir()) == []  # neither the archive nor its .part, and nothing outside
    assert not (tmp_path.parent.parent / "escape.tar.gz").exists()


def test_a_rank_goes_to_the_server_and_only_with_peft_lora(tmp_path, capsys):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(dict(request.url.params))
        return httpx.Response(200, content=b"archive")

    client = ApiClient("http://test/v1", None, transport=httpx.MockTransport(handler))
    result = artifacts.download(client, "ftjob-x", "peft_lora", None, str(tmp_path), rank=16)
    assert seen == [{"format": "peft_lora", "rank": "16"}]
    assert result["path"] == str(tmp_path / "ftjob-x-peft_lora-rank-16.tar.gz")

    from svfit_cli.commands import main

    assert main(["artifacts", "download", "ftjob-x", "--format", "svfit", "--rank", "16"]) == base.EXIT_ERROR
    assert "error: invalid_parameter: --rank applies only to --format peft_lora" in capsys.readouterr().err


def test_classify_sends_a_text_or_a_pair_and_prints_the_labels_most_likely_first(tmp_path, monkeypatch, capsys):
    from svfit_cli.commands import main

    sent = []
    answer = {"id": "clf-1", "object": "list", "model": "nli", "usage": {},
              "data": [{"index": 0, "object": "classification", "label": "entailment", "labels": [
                  {"label": "entailment", "probability": 0.75}, {"label": "contradiction", "probability": 0.25}]}]}

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.path, json.loads(request.content)))
        if isinstance(sent[-1][1]["input"], str):  # as a model trained on pairs answers a bare string
            return httpx.Response(400, json={"error": {"message": "The model 'nli' was trained on text pairs.",
                                                       "type": "invalid_request_error", "param": "input",
                                                       "code": "invalid_input_kind"}})
        return httpx.Response(200, json=answer)

    transport = httpx.MockTransport(handler)
    monkeypatch.setattr(base, "ApiClient", lambda api_base, api_key: ApiClient(api_base, api_key, transport=transport))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("SVFIT_API_BASE", "http://test/v1")

    assert main(["classify", "nli", "a man sleeps", "--text-pair", "a person rests"]) == base.EXIT_OK
    assert sent[-1] == ("/v1/classifications",
                        {"model": "nli", "input": {"text": "a man sleeps", "text_pair": "a person rests"}})
    assert capsys.readouterr().out.splitlines() == [
        "label          probability", "entailment     0.7500", "contradiction  0.2500"]

    assert main(["classify", "nli", "a man sleeps", "--text-pair", "a person rests", "--json"]) == base.EXIT_OK
    assert json.loads(capsys.readouterr().out) == answer

    assert main(["classify", "nli", "a man sleeps"]) == base.EXIT_ERROR
    assert sent[-1][1] == {"model": "nli", "input": "a man sleeps"}
    assert "error: invalid_input_kind: The model 'nli' was trained on text pairs." in capsys.readouterr().err


def create_args(**values) -> argparse.Namespace:  # noqa: ANN003
    defaults = dict(model="tiny-llama", training_file="file-t", validation_file=None, suffix=None, seed=None,
                    epochs=None, batch_size=None, lr_multiplier=None, method=None, beta=None, peft=None, rank=None,
                    energy=None, target_modules=None, peft_option=None, metadata=None, grader=None,
                    compute_multiplier=None, eval_interval=None, eval_samples=None)
    return argparse.Namespace(**{**defaults, **values})


GRADER = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
          "operation": "eq"}


def test_a_reinforcement_job_sends_its_grader_and_hyperparameters(tmp_path):
    inline = job_body(None, create_args(method="reinforcement", grader=json.dumps(GRADER), compute_multiplier=2,
                                        eval_interval=5))
    assert inline["method"] == {"type": "reinforcement", "reinforcement": {
        "grader": GRADER, "hyperparameters": {"compute_multiplier": 2, "eval_interval": 5}}}
    path = tmp_path / "grader.json"
    path.write_text(json.dumps(GRADER))
    assert job_body(None, create_args(method="reinforcement", grader=str(path)))["method"] == {
        "type": "reinforcement", "reinforcement": {"grader": GRADER}}
    for bad, code, words in [
        (dict(method="reinforcement"), "missing_parameter", "needs --grader"),
        (dict(method="reinforcement", grader="{nope"), "invalid_parameter", "neither a JSON file nor JSON"),
        (dict(method="reinforcement", grader="[1]"), "invalid_parameter", "JSON object"),
        (dict(grader=json.dumps(GRADER)), "invalid_parameter", "only to --method reinforcement"),
        (dict(method="dpo", eval_samples=2), "invalid_parameter", "only to --method reinforcement"),
    ]:
        with pytest.raises(base.CliError) as info:
            job_body(None, create_args(**bad))
        assert info.value.code == code and words in str(info.value), bad


def test_method_and_beta_go_in_openais_method_block():
    assert "method" not in job_body(None, create_args(epochs=2))  # no --method: the legacy shape, as before
    assert job_body(None, create_args(epochs=2))["hyperparameters"] == {"n_epochs": 2}
    body = job_body(None, create_args(method="dpo", beta=0.2, epochs=1))
    assert body["method"] == {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "beta": 0.2}}}
    assert "hyperparameters" not in body
    assert job_body(None, create_args(method="dpo"))["method"] == {"type": "dpo"}
    assert job_body(None, create_args(method="supervised", batch_size=4))["method"] == {
        "type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}}
    with pytest.raises(base.CliError) as info:
        job_body(None, create_args(beta=0.2))
    assert info.value.code == "invalid_parameter" and "--method dpo" in str(info.value)


def test_the_method_is_shown_with_the_peft_type():
    supervised = {"method": {"type": "supervised"}, "peft": {"type": "svfit"}, "hyperparameters": {"n_epochs": 1}}
    dpo = {"method": {"type": "dpo"}, "peft": {"type": "lora"}, "hyperparameters": {"beta": 0.25}}
    assert (_method(supervised), _method_note(supervised)) == ("svfit", "svfit")
    assert (_method(dpo), _method_note(dpo)) == ("dpo/lora", "dpo/lora, beta 0.25")


def test_graders_validate_and_run_send_openais_bodies_and_print_the_reward(tmp_path, monkeypatch, capsys):
    from svfit_cli.commands import main

    grader = {"type": "multi", "name": "both", "graders": {"exact": {"type": "string_check"}},
              "calculate_output": "exact"}
    (tmp_path / "grader.json").write_text(json.dumps(grader))
    (tmp_path / "body.json").write_text(json.dumps({"grader": grader}))
    sent = []
    ran = {"reward": 0.0, "sub_rewards": {"exact": 0.0},
           "model_grader_token_usage_per_model": {"judge": {"total_tokens": 9}},
           "metadata": {"name": "both", "type": "multi", "errors": {}, "error_details": [
               {"flag": "model_grader_parse_error", "message": "No score.", "grader": "grader.graders.judge"}]}}

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.path, json.loads(request.content)))
        if sent[-1][1]["grader"].get("name") == "bad":
            error = {"message": "Unknown operation.", "type": "invalid_request_error",
                     "param": "grader.graders.exact.operation", "code": "invalid_grader"}
            return httpx.Response(400, json={"error": error})
        if request.url.path.endswith("/validate"):
            return httpx.Response(200, json={"grader": sent[-1][1]["grader"]})
        return httpx.Response(200, json=ran)

    transport = httpx.MockTransport(handler)
    monkeypatch.setattr(base, "ApiClient", lambda api_base, api_key: ApiClient(api_base, api_key, transport=transport))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("SVFIT_API_BASE", "http://test/v1")

    for name in ("grader.json", "body.json"):  # a grader, or a request body holding one
        assert main(["graders", "validate", str(tmp_path / name)]) == base.EXIT_OK
        assert sent[-1] == ("/v1/fine_tuning/alpha/graders/validate", {"grader": grader})
        assert capsys.readouterr().out == "valid: multi grader 'both'\n"

    assert main(["graders", "run", str(tmp_path / "grader.json"), "--sample", "Paris", "--item", '{"answer": 1}']) == 0
    assert sent[-1] == ("/v1/fine_tuning/alpha/graders/run",
                        {"grader": grader, "model_sample": "Paris", "item": {"answer": 1}})
    out = capsys.readouterr().out
    assert out.splitlines()[:3] == ["reward: 0", "grader: both (multi)", "models: judge (9 tokens)"]
    assert "exact       0" in out and "model_grader_parse_error at grader.graders.judge: No score." in out
    assert main(["graders", "run", str(tmp_path / "grader.json"), "--sample", "x", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ran and "item" not in sent[-1][1]

    (tmp_path / "bad.json").write_text(json.dumps({**grader, "name": "bad"}))
    assert main(["graders", "validate", str(tmp_path / "bad.json")]) == base.EXIT_ERROR
    assert capsys.readouterr().err == "error: invalid_grader: Unknown operation. (grader.graders.exact.operation)\n"
    (tmp_path / "broken.json").write_text("{nope")
    assert main(["graders", "validate", str(tmp_path / "broken.json")]) == base.EXIT_ERROR
    assert capsys.readouterr().err.startswith("error: invalid_json: ")
    assert main(["graders", "validate", str(tmp_path / "missing.json")]) == base.EXIT_ERROR
    assert capsys.readouterr().err.startswith("error: file_unreadable: ")
    with pytest.raises(SystemExit) as bad_item:  # a bad command line: argparse's exit 2
        main(["graders", "run", str(tmp_path / "grader.json"), "--sample", "x", "--item", "{not json"])
    assert bad_item.value.code == 2


def chat_args(**values) -> argparse.Namespace:  # noqa: ANN003
    defaults = dict(model="m", max_tokens=None, temperature=None, top_p=None, seed=None, tools=None,
                    tool_choice=None, response_format=None)
    return argparse.Namespace(**{**defaults, **values})


def test_chat_sends_tools_a_tool_choice_and_a_response_format(tmp_path):
    from svfit_cli.client.chat import _call_line, _request

    tools = [{"type": "function", "function": {"name": "f"}}]
    body = _request(chat_args(tools=json.dumps(tools), tool_choice="f"), [], False)
    assert body["tools"] == tools and body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert _request(chat_args(tool_choice="required"), [], False)["tool_choice"] == "required"
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    assert _request(chat_args(response_format=str(schema)), [], False)["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    assert _request(chat_args(response_format="json_object"), [], False)["response_format"] == {"type": "json_object"}
    with pytest.raises(base.CliError) as info:
        _request(chat_args(tools="[nope"), [], False)
    assert info.value.code == "invalid_parameter" and "--tools" in str(info.value)
    assert _call_line({"function": {"name": "f", "arguments": '{"x": 1}'}}) == '[tool call] f {"x": 1}'
