"""The function-calling parts of a chat training line, at the JSON level: OpenAI's fine-tuning format.

A line may declare ``tools`` (``[{"type": "function", "function": {"name", "description"?, "parameters"?}}]``)
or, legacy, ``functions`` (the bare function objects). An assistant message may carry ``tool_calls``
(``[{"id", "type": "function", "function": {"name", "arguments": "<JSON object>"}}]``, its ``content`` then
may be null) or, legacy, one ``function_call`` (``{"name", "arguments"}``). A ``tool`` message answers a call
by its ``tool_call_id``; a legacy ``function`` message by its ``name``. How these are rendered for the model is
``svfit_core.tool_calls``.
"""

from __future__ import annotations

import json
from typing import Any

# Message fields that belong to function calling; `data._message_errors` leaves them to this module.
CALL_FIELDS = ("tool_calls", "function_call", "tool_call_id")


def declared_tool_names(example: dict) -> tuple[set[str] | None, list[str]]:
    """The names of the functions the line declares (None when it declares none) and what is wrong with the
    declaration."""
    if "tools" in example and "functions" in example:
        return None, ["give 'tools' or the legacy 'functions', not both"]
    if "tools" in example:
        tools, key = example["tools"], "tools"
    elif "functions" in example:
        tools, key = example["functions"], "functions"
    else:
        return None, []
    if not isinstance(tools, list) or not tools:
        return None, [f"'{key}' must be a non-empty list"]
    names: set[str] = set()
    errors: list[str] = []
    for i, tool in enumerate(tools):
        where = f"{key}[{i}]"
        function = tool
        if key == "tools":
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
                errors.append(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
                continue
            function = tool["function"]
            where += ".function"
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            errors.append(f"{where} must have a non-empty string 'name'")
            continue
        if function["name"] in names:
            errors.append(f"{where} repeats the function name {function['name']!r}")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            errors.append(f"{where} 'parameters' must be a JSON schema object")
        names.add(function["name"])
    return names, errors


def _call_errors(call: Any, where: str, names: set[str] | None, legacy: bool) -> tuple[str | None, list[str]]:
    """(the call's id, its problems)."""
    function = call
    call_id = None
    if not legacy:
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            return None, [f"{where} must be {{\"id\": ..., \"type\": \"function\", \"function\": {{...}}}}"]
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            return None, [f"{where} has no string 'id' (a tool message answers the call by it)"]
        function = call.get("function")
        where += ".function"
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return call_id, [f"{where} must have a string 'name'"]
    errors = []
    name = function["name"]
    if names is None:
        errors.append(f"{where} calls {name!r} but the line declares no tools")
    elif name not in names:
        errors.append(f"{where} calls {name!r}, which is not one of the line's tools {sorted(names)}")
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        errors.append(f"{where} 'arguments' must be a string of JSON, got {type(arguments).__name__}")
    else:
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as exc:
            errors.append(f"{where} 'arguments' is not valid JSON ({exc.msg} at character {exc.pos})")
        else:
            if not isinstance(parsed, dict):
                errors.append(f"{where} 'arguments' must be a JSON object, got {type(parsed).__name__}")
    return call_id, errors


def tool_errors(example: dict) -> list[str]:
    """Problems with a chat line's tools, its assistant messages' calls and its tool messages' answers."""
    names, errors = declared_tool_names(example)
    open_calls: set[str] = set()  # ids called and not yet answered
    for i, message in enumerate(example["messages"]):
        if not isinstance(message, dict):
            continue
        where, role = f"messages[{i}]", message.get("role")
        if role != "assistant" and ("tool_calls" in message or "function_call" in message):
            errors.append(f"{where} has tool calls but only assistant messages make them")
        if role == "assistant":
            if "tool_calls" in message and "function_call" in message:
                errors.append(f"{where} has both 'tool_calls' and the legacy 'function_call'")
            calls = message.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list) or not calls:
                    errors.append(f"{where} 'tool_calls' must be a non-empty list")
                    calls = []
                for j, call in enumerate(calls):
                    call_id, call_errors = _call_errors(call, f"{where}.tool_calls[{j}]", names, legacy=False)
                    errors.extend(call_errors)
                    if call_id is not None:
                        open_calls.add(call_id)
            if message.get("function_call") is not None:
                errors.extend(_call_errors(message["function_call"], f"{where}.function_call", names, True)[1])
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                errors.append(f"{where} (a tool result) has no string 'tool_call_id'")
            elif call_id not in open_calls:
                errors.append(f"{where} answers tool call {call_id!r}, which no earlier assistant message made")
        if role == "function" and not isinstance(message.get("name"), str):
            errors.append(f"{where} (a legacy function result) has no string 'name'")
    return errors


def makes_calls(message: dict) -> bool:
    """An assistant message whose turn is (or includes) tool calls: its content may be null."""
    return bool(message.get("tool_calls") or message.get("function_call"))
