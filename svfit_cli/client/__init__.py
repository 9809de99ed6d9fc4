"""The client half of the `svfit` command: `jobs`, `files`, `artifacts`, `chat`, `classify` and `graders`,
talking to a running service through its public HTTP API only (the same endpoints and key as any other client).

`register()` adds the client commands to the server CLI's parser (svfit_cli.py). Each module owns one
resource; `base` owns what they share: where the API is, the key, the exit codes and error printing.
"""

from __future__ import annotations

import argparse

from svfit_cli.client import artifacts, chat, classify, files, graders, jobs
from svfit_cli.client.base import client_options


def register(commands: argparse._SubParsersAction) -> None:
    """Add `jobs`, `files`, `artifacts`, `chat`, `classify` and `graders` to the `svfit` sub-command table."""
    common = client_options()
    for module in (jobs, files, artifacts, chat, classify, graders):
        module.add_commands(commands, common)
