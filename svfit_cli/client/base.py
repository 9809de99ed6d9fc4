"""What every client command shares: where the API is and which key to send, the exit codes scripts can rely
on, and the one place an error becomes `error: <code>: <message>` on stderr.

Settings are looked up flag first, then environment, then `~/.config/svfit/config.json`
(`{"api_base": "...", "api_key": "..."}`; `$XDG_CONFIG_HOME` is honoured), then the loopback default.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from svfit_cli.client.http import ApiClient, ApiError, ApiUnreachable

DEFAULT_API_BASE = "http://127.0.0.1:8000/v1"

# Exit codes. 2 is argparse's own for a bad command line; 130 is the shell's for Ctrl+C.
EXIT_OK = 0
EXIT_ERROR = 1  # the API (or a check of what it sent) refused: the code is printed
EXIT_UNREACHABLE = 3  # no answer from the API at all
EXIT_JOB_UNSUCCESSFUL = 4  # a followed job ended failed or cancelled
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class ClientConfig:
    api_base: str
    api_key: str | None


def config_path() -> Path:
    root = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(root) / "svfit" / "config.json"


def _config_file() -> dict:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        # A broken config file should not be silently ignored: the user would send no key and wonder why.
        raise CliError("invalid_config", f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CliError("invalid_config", f"{path} must hold a JSON object")
    return data


def resolve_config(args: argparse.Namespace) -> ClientConfig:
    stored: dict | None = None

    def pick(flag: str, variable: str, key: str) -> str | None:
        nonlocal stored
        value = getattr(args, flag, None) or os.environ.get(variable)
        if value:
            return value
        if stored is None:
            stored = _config_file()
        return stored.get(key) or None

    api_base = pick("api_base", "SVFIT_API_BASE", "api_base") or DEFAULT_API_BASE
    return ClientConfig(api_base=api_base.rstrip("/"), api_key=pick("api_key", "SVFIT_API_KEY", "api_key"))


def client_options() -> argparse.ArgumentParser:
    """Options every client command takes (as a parent parser, so they go after the command)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("client options")
    group.add_argument("--api-base", help=f"API base URL (default: $SVFIT_API_BASE, the config file, or {DEFAULT_API_BASE})")
    group.add_argument("--api-key", help="API key (default: $SVFIT_API_KEY or the config file; none on loopback)")
    group.add_argument("--json", dest="json_output", action="store_true", help="print JSON objects for scripts")
    return common


class CliError(Exception):
    """A failure the CLI detected itself (a checksum mismatch, an unusable file); printed like an API error."""

    def __init__(self, code: str, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = exit_code


def fail(code: str, message: str) -> int:
    print(f"error: {code}: {message}", file=sys.stderr, flush=True)
    return EXIT_ERROR


Handler = Callable[[ApiClient, argparse.Namespace], int | None]


def client_command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: build the client from the resolved config, and turn every failure into a printed
    error code and an exit status."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            config = resolve_config(args)
            with ApiClient(config.api_base, config.api_key) as client:
                return int(handler(client, args) or EXIT_OK)
        except ApiError as exc:
            return fail(exc.code, exc.message)
        except ApiUnreachable as exc:
            print(f"error: api_unreachable: {exc}", file=sys.stderr, flush=True)
            return EXIT_UNREACHABLE
        except CliError as exc:
            print(f"error: {exc.code}: {exc.message}", file=sys.stderr, flush=True)
            return exc.exit_code
        except KeyboardInterrupt:
            print("", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (`svfit jobs list | head`): stop quietly, and point stdout at /dev/null
            # so the interpreter's final flush does not raise a second time.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_ERROR

    return run


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False), flush=True)
