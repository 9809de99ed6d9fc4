"""`svfit artifacts download JOB --format svfit|peft_lora|merged [--step N] [--rank N] [-o PATH]`: a job's weights.

The archive is streamed to `PATH.part` while its sha256 is computed, checked against the server's
`X-Content-SHA256`, and only then renamed into place, so a finished file is always a verified one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from pathlib import Path
from urllib.parse import unquote

import httpx

from svfit_cli.client.base import CliError, client_command, print_json
from svfit_cli.client.http import ApiClient
from svfit_cli.client.progress import ProgressBar, human_bytes

# The first request for an archive may export (or merge) the model on the server before a byte is sent.
FIRST_BYTE_TIMEOUT_S = 900.0
CHUNK_BYTES = 1024 * 1024


def _server_filename(response: httpx.Response) -> str | None:
    disposition = response.headers.get("content-disposition", "")
    encoded = re.search(r"filename\*=(?:UTF-8|utf-8)''([^;]+)", disposition)
    if encoded:
        return unquote(encoded.group(1))
    plain = re.search(r'filename="?([^";]+)"?', disposition)
    return plain.group(1) if plain else None


def _destination(requested: str | None, response: httpx.Response, fallback: str) -> Path:
    # Only the last component of the server's name: it must not choose where on disk the file goes.
    name = Path(_server_filename(response) or fallback).name or fallback
    if requested is None:
        return Path(name)
    path = Path(requested)
    return path / name if path.is_dir() else path


def download(
    client: ApiClient, job_id: str, fmt: str, step: int | None, output: str | None, rank: int | None = None
) -> dict:
    given = {key: value for key, value in (("step", step), ("rank", rank)) if value is not None}
    params = {"format": fmt, **given}
    timeout = httpx.Timeout(FIRST_BYTE_TIMEOUT_S, connect=10.0)
    with client.stream("GET", f"fine_tuning/jobs/{job_id}/artifacts", params=params, timeout=timeout) as response:
        fallback = f"{job_id}-{fmt}" + "".join(f"-{key}-{value}" for key, value in given.items()) + ".tar.gz"
        path = _destination(output, response, fallback)
        expected = response.headers.get("x-content-sha256")
        total = int(response.headers["content-length"]) if response.headers.get("content-length", "").isdigit() else None
        bar = ProgressBar(f"download {path.name}", total=total, fmt=human_bytes)
        digest = hashlib.sha256()
        size = 0
        part = path.with_name(path.name + ".part")
        try:
            with part.open("wb") as out:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(size)
            bar.close()
            actual = digest.hexdigest()
            if expected and expected.lower() != actual:
                raise CliError("checksum_mismatch", f"{path}: sha256 {actual}, the server announced {expected}")
            os.replace(part, path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    return {"path": str(path), "bytes": size, "sha256": actual, "verified": bool(expected)}


@client_command
def cmd_download(client: ApiClient, args: argparse.Namespace) -> None:
    if args.rank is not None and args.format != "peft_lora":
        raise CliError("invalid_parameter", "--rank applies only to --format peft_lora")
    result = download(client, args.job_id, args.format, args.step, args.output, rank=args.rank)
    if args.json_output:
        print_json(result)
    else:
        print(result["path"])


def add_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    artifacts = commands.add_parser("artifacts", help="a job's weights (client: talks to a running service)")
    sub = artifacts.add_subparsers(dest="artifacts_command", required=True)
    download_cmd = sub.add_parser("download", parents=[common], help="download and verify (sha256) an archive")
    download_cmd.add_argument("job_id")
    download_cmd.add_argument("--format", default="svfit", choices=["svfit", "peft_lora", "merged"])
    download_cmd.add_argument("--step", type=int, help="a checkpoint's step (default: the final weights)")
    download_cmd.add_argument(
        "--rank", type=int, help="peft_lora only: the LoRA rank, 1-512 (default: the server's serving rank, 256)"
    )
    download_cmd.add_argument("-o", "--output", help="file or directory (default: the server's name, here)")
    download_cmd.set_defaults(func=cmd_download)
