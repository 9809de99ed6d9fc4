"""Tools at a replica's edge: OpenAI's tools and tool_choice checked, the answer read back into tool_calls whole
or streamed (however the text arrives in pieces), and a chosen tool starting the answer."""

from __future__ import annotations

import json

import pytest

from api.core.errors import InvalidParameter
from serving.tool_use import ToolCallStream, check_tool_use, tool_calls_of
from tests.serving.conftest import LLAMA
from tests.serving.test_routes import chat

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_tool_choice_decides_what_is_rendered_and_what_constrains_the_answer():
    assert check_tool_use(None, None) is None and check_tool_use([], "auto") is None
    auto = check_tool_use([WEATHER], None)
    assert auto.tools == (WEATHER,) and auto.grammar is None
    assert check_tool_use([WEATHER], "none").tools is None
    required = check_tool_use([WEATHER, TIME], "required")
    assert "get_weather" in required.grammar and "get_time" in required.grammar
    named = check_tool_use([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert "get_weather" in named.grammar and "get_time" not in named.grammar
    legacy = check_tool_use(None, None, [WEATHER["function"], TIME["function"]], {"name": "get_weather"})
    assert legacy.tools == (WEATHER, TIME) and legacy.grammar == named.grammar


@pytest.mark.parametrize(("args", "param"), [
    (({"not": "a list"}, None), "tools"),
    (([{"type": "function"}], None), "tools[0]"),
    (([{"type": "function", "function": {"description": "x"}}], None), "tools[0].function.name"),
    (([{"type": "function", "function": {"name": "f", "parameters": []}}], None), "tools[0].function.parameters"),
    (([WEATHER], "sometimes"), "tool_choice"),
    (([WEATHER], {"type": "function", "function": {"name": "get_time"}}), "tool_choice"),
    ((None, "required"), "tool_choice"),
    (([WEATHER], None, [WEATHER["function"]]), "functions"),
    ((None, None, [WEATHER["function"]], "required"), "function_call"),
])
def test_bad_tools_are_a_400_naming_the_field(args, param):
    with pytest.raises(InvalidParameter) as info:
        check_tool_use(*args)
    assert info.value.param == param


ANSWER = ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
          '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>')


def test_a_whole_answer_is_read_into_calls_with_ids():
    content, calls = tool_calls_of(check_tool_use([WEATHER], "auto"), ANSWER)
    assert content == "Let me look."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}), ("function", "get_weather", {"city": "Rome"})]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    assert tool_calls_of(check_tool_use([WEATHER], "auto"), "no json here") == ("no json here", [])


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_a_streamed_answer_reassembles_to_the_whole_one_however_it_is_cut(piece):
    use = check_tool_use([WEATHER], "auto")
    stream = ToolCallStream(use)
    deltas = []
    for start in range(0, len(ANSWER), piece):
        deltas += stream.feed(ANSWER[start:start + piece])
    deltas += stream.finish()
    text = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    whole_content, whole_calls = tool_calls_of(use, ANSWER)
    assert text.strip() == whole_content and "<tool" not in text
    assert [c["index"] for c in calls] == [0, 1]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole_calls]


def test_text_that_only_looks_like_a_call_comes_out_as_text():
    stream = ToolCallStream(check_tool_use([WEATHER], "auto"))
    out = stream.feed("a <tool") + stream.feed("_call>not json</tool_call> b <to") + stream.finish()
    assert "".join(d["content"] for d in out) == "a <tool_call>not json</tool_call> b <to"


def test_tools_are_rendered_into_the_prompt_unless_the_choice_is_none(served):
    tools = [{"type": "function", "function": {"name": "f"}}]  # short: the tiny model reads 64 tokens
    hi = [{"role": "user", "content": "hi"}]
    auto = chat(served, LLAMA, messages=hi, tools=tools, max_tokens=1).json()
    none = chat(served, LLAMA, messages=hi, tools=tools, max_tokens=1, tool_choice="none").json()
    plain = chat(served, LLAMA, messages=hi, max_tokens=1).json()
    assert none["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] < auto["usage"]["prompt_tokens"]
