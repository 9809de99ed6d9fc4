"""`svfit chat MODEL`: talk to a base model or a fine-tune through `/v1/chat/completions`, streamed.

Interactive by default (the conversation is kept; Ctrl+D or `/exit` ends it); `--message TEXT` (or text
piped on stdin) makes it one turn, for scripts. `--json` asks for the whole answer unstreamed and prints it.
`--tools` (a JSON file or text: OpenAI's tools list) lets the model call functions, shown as
`[tool call] name {arguments}` lines; `--tool-choice` and `--response-format` (`json_object`, or a JSON schema
file or text) ask for a call or a document.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from svfit_cli.client.base import EXIT_OK, CliError, client_command, print_json
from svfit_cli.client.http import ApiClient, server_sent_events

# Generation can queue behind other requests in a batch; a silent minute is not a dead server.
STREAM_TIMEOUT_S = 300.0


def _json_argument(value: str, flag: str):  # noqa: ANN202 - whatever JSON the flag holds
    """A flag's JSON: a file's path, or the JSON itself."""
    path = Path(value)
    try:
        return json.loads(path.read_text() if path.is_file() else value)
    except json.JSONDecodeError as exc:
        raise CliError("invalid_parameter", f"{flag} is neither a JSON file nor JSON: {exc}") from None


def _request(args: argparse.Namespace, messages: list[dict], stream: bool) -> dict:
    body: dict = {"model": args.model, "messages": messages, "stream": stream}
    for key in ("max_tokens", "temperature", "top_p", "seed"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.tools:
        body["tools"] = _json_argument(args.tools, "--tools")
    if args.tool_choice:
        choice = args.tool_choice
        body["tool_choice"] = choice if choice in ("none", "auto", "required") else \
            {"type": "function", "function": {"name": choice}}
    if args.response_format:
        body["response_format"] = {"type": "json_object"} if args.response_format == "json_object" else \
            {"type": "json_schema", "json_schema": {"name": "answer",
                                                    "schema": _json_argument(args.response_format,
                                                                             "--response-format")}}
    return body


def _call_line(call: dict) -> str:
    function = call.get("function") or {}
    return f"[tool call] {function.get('name')} {function.get('arguments')}"


def stream_reply(client: ApiClient, args: argparse.Namespace, messages: list[dict]) -> str:
    """Print the assistant's reply as it arrives; return it whole."""
    parts: list[str] = []
    with client.stream("POST", "chat/completions", json=_request(args, messages, True), timeout=STREAM_TIMEOUT_S) as response:
        for chunk in server_sent_events(response):
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                text = delta.get("content") or ""
                for call in delta.get("tool_calls") or []:  # each arrives whole (serving/tool_use.py)
                    text += ("\n" if parts or text else "") + _call_line(call)
                if text:
                    parts.append(text)
                    sys.stdout.write(text)
                    sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


def _interactive(client: ApiClient, args: argparse.Namespace, messages: list[dict]) -> None:
    print(f"chatting with {args.model}; Ctrl+D or /exit to end", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": stream_reply(client, args, messages)})


@client_command
def cmd_chat(client: ApiClient, args: argparse.Namespace) -> int:
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    message = args.message
    if message is None and not sys.stdin.isatty():
        message = sys.stdin.read()
    if message is None:
        _interactive(client, args, messages)
        return EXIT_OK
    messages.append({"role": "user", "content": message})
    if args.json_output:
        print_json(client.post("chat/completions", _request(args, messages, False), timeout=STREAM_TIMEOUT_S))
    else:
        stream_reply(client, args, messages)
    return EXIT_OK


def add_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    chat = commands.add_parser("chat", parents=[common], help="chat with a model, streamed (client)")
    chat.add_argument("model", help="a base model or fine-tune id (see GET /v1/models)")
    chat.add_argument("-m", "--message", help="one turn: send this, print the reply, exit")
    chat.add_argument("--system", help="a system message to start the conversation")
    chat.add_argument("--max-tokens", dest="max_tokens", type=int)
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--top-p", dest="top_p", type=float)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--tools", help="functions the model may call: OpenAI's tools list, a JSON file or text")
    chat.add_argument("--tool-choice", help="none, auto, required, or a function's name (with --tools)")
    chat.add_argument("--response-format", help="json_object, or a JSON schema (file or text) the answer follows")
    chat.set_defaults(func=cmd_chat)
