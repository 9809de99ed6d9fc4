"""A chat request's tools: OpenAI's `tools` / `tool_choice` (and legacy `functions` / `function_call`) checked
into what the engine renders, and the model's answer read back into `tool_calls`, whole or as a stream.

The conversation, its tools, calls and results are rendered by ``svfit_core.tool_calls``, as training renders
them. ``tool_choice``: "none" renders no tools (the model answers in text); "auto" lets the model choose;
"required" and a named function constrain decoding to one call to one of the tools (or the named one) whose
arguments validate against the tool's `parameters` (serving/structured.py). The answer is then parsed back;
under "auto" a call the model wrote badly stays text.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from api.core.errors import InvalidParameter
from serving.structured import tool_call_grammar
from svfit_core.tool_calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_tool_calls

__all__ = ["ToolUse", "ToolCallStream", "check_tool_use", "tool_calls_of"]


@dataclass(frozen=True)
class ToolUse:
    """What a request asks of tools: the tools rendered into the prompt (None: none), and the grammar the
    answer must follow ("required" or a named tool; None for "auto")."""

    tools: tuple[dict, ...] | None
    grammar: str | None = None


def _function(tool: Any, where: str, legacy: bool) -> dict:
    function = tool
    if not legacy:
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise InvalidParameter(f"'{where}' must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}.",
                                   param=where)
        function = tool["function"]
        where += ".function"
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise InvalidParameter(f"'{where}' must have a non-empty string 'name'.", param=f"{where}.name")
    if "parameters" in function and not isinstance(function["parameters"], dict):
        raise InvalidParameter(f"'{where}.parameters' must be a JSON schema object.", param=f"{where}.parameters")
    return {"type": "function", "function": function}


def check_tool_use(tools: Any, tool_choice: Any, functions: Any = None, function_call: Any = None) -> ToolUse | None:
    """The request's tool use, or None when it declares no tools. A 400 names the field at fault."""
    if tools and functions:
        raise InvalidParameter("Give 'tools' or the legacy 'functions', not both.", param="functions")
    legacy = not tools and bool(functions)
    field, choice_field = ("functions", "function_call") if legacy else ("tools", "tool_choice")
    declared = functions if legacy else tools
    choice = function_call if legacy else tool_choice
    if not declared:
        if choice not in (None, "none", "auto"):
            raise InvalidParameter(f"'{choice_field}' names a tool, but the request declares none in '{field}'.",
                                   param=choice_field)
        return None
    if not isinstance(declared, list):
        raise InvalidParameter(f"'{field}' must be a list.", param=field)
    listed = [_function(t, f"{field}[{i}]", legacy) for i, t in enumerate(declared)]
    names = [t["function"]["name"] for t in listed]
    choice = "auto" if choice is None else choice
    if choice == "none":
        return ToolUse(tools=None)
    if choice == "auto":
        return ToolUse(tools=tuple(listed))
    if choice == "required" and not legacy:
        return ToolUse(tools=tuple(listed), grammar=tool_call_grammar(listed, choice_field))
    named = _named_choice(choice, legacy)
    if named is None:
        shapes = '"none", "auto" or {"name": ...}' if legacy else \
            '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
        raise InvalidParameter(f"'{choice_field}' must be {shapes}.", param=choice_field)
    if named not in names:
        raise InvalidParameter(f"'{choice_field}' names {named!r}, which is not one of the tools {names}.",
                               param=choice_field)
    chosen = [t for t in listed if t["function"]["name"] == named]
    return ToolUse(tools=tuple(listed), grammar=tool_call_grammar(chosen, choice_field))


def _named_choice(choice: Any, legacy: bool) -> str | None:
    if not isinstance(choice, dict):
        return None
    if legacy:
        return choice.get("name") if isinstance(choice.get("name"), str) else None
    function = choice.get("function")
    if choice.get("type") == "function" and isinstance(function, dict) and isinstance(function.get("name"), str):
        return function["name"]
    return None


def _call_object(call: dict, index: int | None = None) -> dict:
    out = {"id": f"call_{secrets.token_hex(12)}", "type": "function",
           "function": {"name": call["name"], "arguments": call["arguments"]}}
    return {"index": index, **out} if index is not None else out


def tool_calls_of(use: ToolUse, text: str) -> tuple[str | None, list[dict]]:
    """A whole answer as (content, tool_calls)."""
    content, calls = parse_tool_calls(text)
    if not calls:
        return text, []
    return content, [_call_object(c) for c in calls]


class ToolCallStream:
    """One streamed choice's text deltas turned into content deltas and whole tool calls: text that may open a
    call is held back until the call closes (then it is one `tool_calls` delta) or the answer ends (then it
    is text after all)."""

    def __init__(self, use: ToolUse) -> None:
        self.pending = ""
        self.calls = 0

    def feed(self, text: str) -> list[dict]:
        """The deltas (``{"content": ...}`` or ``{"tool_calls": [...]}``) the new text completes."""
        self.pending += text
        out: list[dict] = []
        while True:
            start = self.pending.find(TOOL_CALL_OPEN)
            if start < 0:
                keep = _open_prefix_length(self.pending)
                ready, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
                if ready:
                    out.append({"content": ready})
                return out
            end = self.pending.find(TOOL_CALL_CLOSE, start)
            if start > 0:
                out.append({"content": self.pending[:start]})
                self.pending = self.pending[start:]
                continue
            if end < 0:
                return out  # inside a call: wait for its end
            block, self.pending = self.pending[: end + len(TOOL_CALL_CLOSE)], self.pending[end + len(TOOL_CALL_CLOSE):]
            _content, calls = parse_tool_calls(block)
            if calls:
                out.append({"tool_calls": [_call_object(calls[0], self.calls)]})
                self.calls += 1
            else:
                out.append({"content": block})

    def finish(self) -> list[dict]:
        """What is still held back, as text: an unclosed call was never a call."""
        rest, self.pending = self.pending, ""
        return [{"content": rest}] if rest else []


def _open_prefix_length(text: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``<tool_call>``."""
    for n in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-n:]):
            return n
    return 0
