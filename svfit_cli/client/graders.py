"""`svfit graders validate FILE.json` and `svfit graders run FILE.json --sample TEXT [--item JSON]`: OpenAI's
graders (`/v1/fine_tuning/alpha/graders`), to try one before a reinforcement job uses it.

FILE holds a grader object (or a request body `{"grader": {...}}`); `-` reads it from stdin. A refused grader
prints `error: <code>: <message> (<field path>)` and exits 1; a sample the grader could not grade is not a
refusal: the run prints its reward (0) with the flag and the grader that failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from svfit_cli.client.base import EXIT_OK, CliError, client_command, print_json
from svfit_cli.client.http import ApiClient, ApiError
from svfit_cli.client.output import fields, table

GRADERS = "fine_tuning/alpha/graders"
# A model grader's first call may load its model on a serving replica.
RUN_TIMEOUT_S = 300.0


def read_grader(name: str) -> dict:
    """The grader in FILE (or stdin for `-`): a grader object, or a body that holds one under `grader`."""
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError("file_unreadable", f"{name}: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CliError("invalid_json", f"{name}: {exc}") from exc
    if isinstance(value, dict) and "type" not in value and isinstance(value.get("grader"), dict):
        value = value["grader"]
    if not isinstance(value, dict):
        raise CliError("invalid_grader", f"{name} must hold a JSON object: a grader, or {{\"grader\": {{...}}}}")
    return value


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc


def _post(client: ApiClient, action: str, body: dict, **kwargs: Any) -> dict:
    """The answer; a refusal names the field (`grader.graders.judge.model`) the message may not quote."""
    try:
        return client.post(f"{GRADERS}/{action}", body, **kwargs)
    except ApiError as exc:
        if exc.param and exc.param not in exc.message:
            raise ApiError(exc.status, exc.code, f"{exc.message} ({exc.param})", exc.param) from exc
        raise


@client_command
def cmd_validate(client: ApiClient, args: argparse.Namespace) -> int:
    answer = _post(client, "validate", {"grader": read_grader(args.file)})
    if args.json_output:
        print_json(answer)
    else:
        grader = answer["grader"]
        print(f"valid: {grader.get('type')} grader '{grader.get('name')}'")
    return EXIT_OK


@client_command
def cmd_run(client: ApiClient, args: argparse.Namespace) -> int:
    body = {"grader": read_grader(args.file), "model_sample": args.sample}
    if args.item is not None:
        body["item"] = args.item
    answer = _post(client, "run", body, timeout=RUN_TIMEOUT_S)
    if args.json_output:
        print_json(answer)
        return EXIT_OK
    metadata = answer["metadata"]
    usage = answer.get("model_grader_token_usage_per_model") or {}
    fields([
        ("reward", f"{answer['reward']:g}"),
        ("grader", f"{metadata['name']} ({metadata['type']})"),
        ("models", ", ".join(f"{m} ({u.get('total_tokens', '?')} tokens)" for m, u in usage.items()) or None),
    ])
    if answer.get("sub_rewards"):
        print()
        table(["sub-grader", "reward"], [(key, f"{value:g}") for key, value in answer["sub_rewards"].items()])
    for failure in metadata.get("error_details") or []:
        print(f"\n{failure['flag']} at {failure['grader']}: {failure['message']}")
    return EXIT_OK


def add_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    graders = commands.add_parser("graders", help="check or try an OpenAI grader (client: talks to a running service)")
    sub = graders.add_subparsers(dest="graders_command", required=True)

    validate = sub.add_parser("validate", parents=[common], help="check a grader; names the field that is wrong")
    validate.add_argument("file", metavar="FILE.json", help="a grader object ('-': stdin)")
    validate.set_defaults(func=cmd_validate)

    run = sub.add_parser("run", parents=[common], help="grade one sample; prints the reward and sub-rewards")
    run.add_argument("file", metavar="FILE.json", help="a grader object ('-': stdin)")
    run.add_argument("--sample", required=True, metavar="TEXT", help="the model's answer (the `sample` namespace)")
    run.add_argument("--item", type=_json_value, metavar="JSON", help="the dataset row (the `item` namespace), as JSON")
    run.set_defaults(func=cmd_run)
