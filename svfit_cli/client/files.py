"""`svfit files upload|list|get|delete`: training files, uploaded as a stream with a byte progress bar."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import BinaryIO

from svfit_cli.client.base import EXIT_ERROR, EXIT_OK, CliError, client_command, print_json
from svfit_cli.client.http import ApiClient
from svfit_cli.client.output import fields, table, when
from svfit_cli.client.progress import ProgressBar, human_bytes

# Uploads can be large and the server validates as it stores: allow a slow link, never a stalled one forever.
UPLOAD_TIMEOUT_S = 600.0


class _CountingReader:
    """A file wrapper that reports bytes as httpx reads them for the multipart body.

    `fileno` is passed through so httpx can size the body (and send Content-Length, which the server's
    size limit checks before reading); `seek(0)` restarts the count when a request body is rebuilt.
    """

    def __init__(self, raw: BinaryIO, bar: ProgressBar):
        self._raw = raw
        self._bar = bar
        self._read = 0

    def fileno(self) -> int:
        return self._raw.fileno()

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._raw.seek(offset, whence)
        self._read = position
        return position

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        self._read += len(chunk)
        self._bar.update(self._read)
        return chunk


def upload(client: ApiClient, path: Path, purpose: str = "fine-tune") -> dict:
    """Upload one file with a progress bar on stderr; returns the FileObject."""
    try:
        size = path.stat().st_size
        raw = path.open("rb")
    except OSError as exc:
        raise CliError("file_unreadable", f"{path}: {exc.strerror or exc}") from exc
    bar = ProgressBar(f"upload {path.name}", total=size, fmt=human_bytes)
    with raw:
        created = client.call(
            "POST", "files", data={"purpose": purpose}, files={"file": (path.name, _CountingReader(raw, bar))},
            timeout=UPLOAD_TIMEOUT_S,
        )
    bar.update(size)
    bar.close(created["status"])
    return created


def _details(file: dict) -> list[tuple[str, object]]:
    return [
        ("id", file["id"]), ("filename", file["filename"]), ("bytes", file["bytes"]), ("purpose", file["purpose"]),
        ("status", file["status"]), ("created", when(file["created_at"])),
    ]


@client_command
def cmd_upload(client: ApiClient, args: argparse.Namespace) -> int:
    created = upload(client, Path(args.path), args.purpose)
    if args.json_output:
        print_json(created)
    else:
        print(created["id"])
    if created["status"] == "error":
        # Stored, but no job can use it: scripts must not carry on as if the upload had worked.
        print(f"error: invalid_training_file: {created.get('status_details') or ''}", file=sys.stderr)
        return EXIT_ERROR
    if not args.json_output and created.get("status_details"):
        print(created["status_details"], file=sys.stderr)
    return EXIT_OK


@client_command
def cmd_list(client: ApiClient, args: argparse.Namespace) -> None:
    items = list(client.pages("files", purpose=args.purpose, order="desc"))
    if args.json_output:
        print_json(items)
        return
    table(["ID", "STATUS", "BYTES", "CREATED", "FILENAME"],
          [[f["id"], f["status"], f["bytes"], when(f["created_at"]), f["filename"]] for f in items])


@client_command
def cmd_get(client: ApiClient, args: argparse.Namespace) -> None:
    file = client.get(f"files/{args.file_id}")
    if args.json_output:
        print_json(file)
        return
    fields(_details(file))
    if file.get("status_details"):
        print("details:")
        for line in file["status_details"].splitlines():
            print(f"  {line}")


@client_command
def cmd_delete(client: ApiClient, args: argparse.Namespace) -> None:
    deleted = client.call("DELETE", f"files/{args.file_id}")
    if args.json_output:
        print_json(deleted)
    else:
        print(f"deleted {deleted['id']}")


def add_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    files = commands.add_parser("files", help="training files (client: talks to a running service)")
    sub = files.add_subparsers(dest="files_command", required=True)

    upload_cmd = sub.add_parser("upload", parents=[common], help="upload a JSONL file; prints its id")
    upload_cmd.add_argument("path")
    upload_cmd.add_argument("--purpose", default="fine-tune")
    upload_cmd.set_defaults(func=cmd_upload)

    list_cmd = sub.add_parser("list", parents=[common], help="list files, newest first")
    list_cmd.add_argument("--purpose")
    list_cmd.set_defaults(func=cmd_list)

    get_cmd = sub.add_parser("get", parents=[common], help="a file and its validation report")
    get_cmd.add_argument("file_id")
    get_cmd.set_defaults(func=cmd_get)

    delete_cmd = sub.add_parser("delete", parents=[common], help="delete a file")
    delete_cmd.add_argument("file_id")
    delete_cmd.set_defaults(func=cmd_delete)
