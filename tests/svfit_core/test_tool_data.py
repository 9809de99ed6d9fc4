"""Function-calling training data: OpenAI's format validated with line numbers, rendered as serving renders it
(the default Hermes-style rendering, or a template's own), masked so the calls train, and read back."""

from __future__ import annotations

import json

import pytest

from svfit_core.tool_calls import TOOL_CALL_OPEN, parse_tool_calls, render_chat, template_takes_tools
from svfit_core.training.data import detect_format, validate_jsonl_line
from svfit_core.training.encoding import chat_segments, encode_example
from testkit.tiny_models import build_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def call(call_id: str = "call_1", name: str = "get_weather", arguments: str = '{"city": "Paris"}') -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_line(**changes) -> dict:
    line = {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "what is the weather in paris ?"},
            {"role": "assistant", "content": None, "tool_calls": [call()]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
            {"role": "assistant", "content": "it is sunny"},
        ],
    }
    line.update(changes)
    return line


def errors_of(line: dict) -> list[str]:
    fmt, errors = validate_jsonl_line(json.dumps(line).encode(), 4)
    assert fmt == "chat"
    assert all(e.startswith("line 4:") for e in errors)
    return errors


def test_openais_function_calling_line_is_valid_chat():
    assert detect_format(tool_line()) == "chat" and errors_of(tool_line()) == []
    legacy = {"functions": [WEATHER["function"]], "messages": [
        {"role": "user", "content": "weather ?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"role": "function", "name": "get_weather", "content": "sunny"},
        {"role": "assistant", "content": "sunny"}]}
    assert errors_of(legacy) == []


def _with_message(index: int, message: dict) -> dict:
    line = tool_line()
    line["messages"][index] = message
    return line


@pytest.mark.parametrize(("line", "expected"), [
    (_with_message(1, {"role": "assistant", "content": None, "tool_calls": [call(name="get_time")]}),
     "calls 'get_time', which is not one of the line's tools"),
    (_with_message(1, {"role": "assistant", "content": None, "tool_calls": [call(arguments="{city: Paris}")]}),
     "'arguments' is not valid JSON"),
    (_with_message(1, {"role": "assistant", "content": None, "tool_calls": [call(arguments="[1]")]}),
     "'arguments' must be a JSON object"),
    (_with_message(2, {"role": "tool", "tool_call_id": "call_9", "content": "x"}),
     "answers tool call 'call_9', which no earlier assistant message made"),
    (_with_message(2, {"role": "tool", "content": "x"}), "no string 'tool_call_id'"),
    (_with_message(0, {"role": "user", "content": "hi", "tool_calls": [call()]}), "only assistant messages make them"),
    (_with_message(1, {"role": "assistant", "content": None, "tool_calls": [{"type": "function",
                                                                            "function": call()["function"]}]}),
     "has no string 'id'"),
    (tool_line(tools=None), "the line declares no tools"),
    (tool_line(tools=[{"type": "function", "function": {"description": "no name"}}]), "non-empty string 'name'"),
    (tool_line(functions=[WEATHER["function"]]), "not both"),
    (_with_message(1, {"role": "assistant", "content": None}), "'content' must be a string"),
])
def test_a_bad_function_calling_line_is_named_with_its_line_number(line, expected):
    if line.get("tools") is None:
        line.pop("tools", None)
    errors = errors_of(line)
    assert any(expected in e for e in errors), errors


def test_the_default_rendering_writes_tools_calls_and_results_as_text_and_trains_the_calls():
    tokenizer = build_tokenizer("llama")  # its template takes no tools
    assert not template_takes_tools(tokenizer)
    line = tool_line()
    segments = chat_segments(line["messages"], tokenizer, line["tools"])
    text = "".join(piece for piece, _ in segments)
    assert text.startswith("<s> system : You can call these functions") and '"name": "get_weather"' in text
    assert "<tool_response>\n{\"sky\": \"sunny\"}\n</tool_response>" in text
    trained = [piece for piece, is_trained in segments if is_trained]
    assert trained == [f'{TOOL_CALL_OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n</tool_call> </s> ',
                       "it is sunny </s> "]
    # Serving renders the same conversation (up to the call) identically, and reads the trained call back.
    prompt = render_chat(tokenizer, line["messages"][:1], line["tools"], generation_prompt=True)
    assert text.startswith(prompt)
    content, calls = parse_tool_calls(trained[0].removesuffix(" </s> "))
    assert content is None and calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    encoded = encode_example(line, "chat", tokenizer, 512)
    assert any(label != -100 for label in encoded.labels)


NATIVE_TEMPLATE = (
    "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}CALL {{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}{% endfor %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_a_template_that_takes_tools_renders_them_itself_with_parsed_arguments():
    tokenizer = build_tokenizer("llama")
    tokenizer.chat_template = NATIVE_TEMPLATE
    assert template_takes_tools(tokenizer)
    line = tool_line()
    segments = chat_segments(line["messages"], tokenizer, line["tools"])
    text = "".join(piece for piece, _ in segments)
    assert text.startswith("TOOLS [") and 'CALL get_weather {"city": "Paris"}' in text
    assert [p for p, t in segments if t] == ['CALL get_weather {"city": "Paris"}', "it is sunny"]


@pytest.mark.parametrize(("answer", "content", "calls"), [
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', None, [("f", '{"x": 1}')]),
    ('sure. <tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": "{}"}'
     '</tool_call>', "sure.", [("f", "{}"), ("g", "{}")]),
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ("plain answer", "plain answer", []),
])
def test_calls_are_read_back_and_anything_else_stays_text(answer, content, calls):
    parsed_content, parsed = parse_tool_calls(answer)
    assert parsed_content == content and [(c["name"], c["arguments"]) for c in parsed] == calls
