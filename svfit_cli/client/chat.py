"""`svfit chat MODEL`: talk to a base model or a fine-tune through `/v1/chat/completions`, streamed.

Interactive by default (the conversation is kept; Ctrl+D or `/exit` ends it); `--message TEXT` (or text
piped on stdin) makes it one turn, for scripts. `--json` asks for the whole answer unstreamed and prints it.
"""

from __future__ import annotations

import argparse
import sys

from svfit_cli.client.base import EXIT_OK, client_command, print_json
from svfit_cli.client.http import ApiClient, server_sent_events

# Generation can queue behind other requests in a batch; a silent minute is not a dead server.
STREAM_TIMEOUT_S = 300.0


def _request(args: argparse.Namespace, messages: list[dict], stream: bool) -> dict:
    body: dict = {"model": args.model, "messages": messages, "stream": stream}
    for key in ("max_tokens", "temperature", "top_p", "seed"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    return body


def stream_reply(client: ApiClient, args: argparse.Namespace, messages: list[dict]) -> str:
    """Print the assistant's reply as it arrives; return it whole."""
    parts: list[str] = []
    with client.stream("POST", "chat/completions", json=_request(args, messages, True), timeout=STREAM_TIMEOUT_S) as response:
        for chunk in server_sent_events(response):
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or ""
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
    chat.set_defaults(func=cmd_chat)
