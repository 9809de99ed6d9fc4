"""Tool calling in a chat: how tools, the assistant's calls and the tools' results are written into the
conversation a chat template renders, and how a model's answer is read back into calls. Training and serving
both go through here, so a fine-tune learns exactly the format it is served with.

Two renderings, chosen by the tokenizer's chat template:

- native: a template that takes ``tools`` (it names the variable) renders the tools, the calls and the results
  itself; calls reach it as OpenAI writes them, with the arguments parsed into an object, as Hugging Face's
  templates expect;
- default, for every other template (SmolLM2's among them): Hermes-style, as NousResearch's Hermes and Qwen
  models write it and vLLM's ``hermes`` parser reads it. The tools go as JSON into the system message
  (``TOOLS_PROMPT``), each call is ``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` in the assistant's
  text, and each result a user turn ``<tool_response>…</tool_response>``.

OpenAI's legacy shapes are read too: ``functions`` (the tools' bare function objects), an assistant's
``function_call`` and ``function`` role results.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "parse_tool_calls",
    "render_chat",
    "template_takes_tools",
    "tools_of",
]

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
# Short on purpose: it rides in every prompt of a request with tools.
TOOLS_PROMPT = (
    "You can call these functions:\n<tools>\n{tools}\n</tools>\nTo call one, answer "
    '<tool_call>\n{{"name": <name>, "arguments": <JSON object>}}\n</tool_call>'
)
_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def tools_of(line: Mapping[str, Any]) -> list[dict] | None:
    """A training line's or a request's tools as OpenAI's ``[{"type": "function", "function": {...}}]``; legacy
    ``functions`` are wrapped so. None when it has neither."""
    if line.get("tools"):
        return list(line["tools"])
    if line.get("functions"):
        return [{"type": "function", "function": f} for f in line["functions"]]
    return None


def template_takes_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tools itself (it reads a ``tools`` variable)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one, or the tool-use one when present
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and re.search(r"\btools\b", template) is not None


def _arguments(call: Mapping[str, Any]) -> Any:
    """A call's arguments as an object: OpenAI sends them as a JSON string."""
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return arguments


def _calls(message: Mapping[str, Any]) -> list[dict]:
    """The assistant message's calls as ``[{"id", "type", "function": {"name", "arguments"}}]`` (legacy
    ``function_call`` included)."""
    if message.get("tool_calls"):
        return list(message["tool_calls"])
    if message.get("function_call"):
        return [{"id": None, "type": "function", "function": message["function_call"]}]
    return []


def _call_text(call: Mapping[str, Any]) -> str:
    function = call.get("function") or {}
    body = {"name": function.get("name"), "arguments": _arguments(function)}
    return f"{TOOL_CALL_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def _default_messages(messages: Sequence[Mapping[str, Any]], tools: list[dict] | None) -> list[dict]:
    out: list[dict] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant":
            calls = _calls(message)
            text = _text(message.get("content"))
            if calls:
                text = "\n".join(([text] if text else []) + [_call_text(c) for c in calls])
            out.append({**_extra(message), "role": "assistant", "content": text})
        elif role in ("tool", "function"):
            out.append({"role": "user", "content": f"{TOOL_RESPONSE_OPEN}\n{_text(message.get('content'))}\n"
                                                   f"{TOOL_RESPONSE_CLOSE}"})
        else:
            out.append({**_extra(message), "role": role, "content": _text(message.get("content"))})
    if tools:
        listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
        prompt = TOOLS_PROMPT.format(tools=listing)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _extra(message: Mapping[str, Any]) -> dict:
    """What else a message carries to the template (``weight`` for training, a ``name``), not the call fields."""
    return {k: v for k, v in message.items() if k not in ("role", "content", "tool_calls", "function_call",
                                                          "tool_call_id")}


def _native_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    out = []
    for message in messages:
        message = dict(message)
        if message.get("role") == "function":
            message["role"] = "tool"
        calls = _calls(message)
        if calls:
            message.pop("function_call", None)
            message["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments(c["function"])}}
                                     for c in calls]
        message["content"] = _text(message.get("content"))
        out.append(message)
    return out


def render_chat(
    tokenizer, messages: Sequence[Mapping[str, Any]], tools: list[dict] | None = None, *,
    generation_prompt: bool = False,
) -> str:
    """The conversation (with its tools, calls and results) as the chat template renders it, in the rendering
    this tokenizer gets (native or default, see the module)."""
    if template_takes_tools(tokenizer) and (tools or any(_calls(m) or m.get("role") in ("tool", "function")
                                                         for m in messages)):
        return tokenizer.apply_chat_template(_native_messages(messages), tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    plain = _default_messages(messages, tools)
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)


def default_messages(messages: Sequence[Mapping[str, Any]], tools: list[dict] | None = None) -> list[dict]:
    """The conversation in the default rendering's plain messages (for templates that take no tools)."""
    return _default_messages(messages, tools)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """An answer in the default rendering split into its text (None when it is only calls) and its calls, each
    ``{"name": str, "arguments": str}`` (the arguments as JSON text, as OpenAI returns them). A ``<tool_call>``
    block that is not a JSON object with a string ``name`` stays in the text."""
    calls: list[dict] = []
    kept: list[str] = []
    cursor = 0
    for match in _CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            continue
        arguments = body.get("arguments", {})
        calls.append({"name": body["name"], "arguments": arguments if isinstance(arguments, str)
                      else json.dumps(arguments, ensure_ascii=False)})
        kept.append(text[cursor:match.start()])
        cursor = match.end()
    kept.append(text[cursor:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls
