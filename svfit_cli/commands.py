"""The `svfit` command table: the server commands (`server.py`) and the HTTP-only client commands
(`client/`) side by side under one parser, and the global options both share.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from svfit_cli import server
from svfit_cli.client import register as register_client_commands


def apply_overrides(args: argparse.Namespace) -> None:
    """Turn command-line options into the `SVFIT_*` environment, so this process and every subprocess
    build the same settings."""
    for option, variable in (("data_dir", "SVFIT_DATA_DIR"), ("host", "SVFIT_HOST"), ("port", "SVFIT_PORT"),
                             ("queue", "SVFIT_WORKER_QUEUE")):
        value = getattr(args, option, None)
        if value is not None:
            os.environ[variable] = str(value)
    from api.core.settings import get_settings

    get_settings.cache_clear()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svfit", description="Self-hosted OpenAI-compatible fine-tuning with SVFit.")
    parser.add_argument("--data-dir", dest="data_dir", help="data directory (default: $SVFIT_DATA_DIR or ./data)")
    commands = parser.add_subparsers(dest="command", required=True)
    server.add_commands(commands)
    register_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_overrides(args)
    return int(args.func(args) or 0)
