"""`svfit jobs create|list|get|follow|cancel|pause|resume`: fine-tuning jobs.

`follow` polls the job and its events (the same public endpoints the dashboard polls), draws step/total,
the latest training loss and the ETA, prints message events as they arrive, and ends with the model id on
stdout, so `MODEL=$(svfit jobs follow ftjob-…)` works in a script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

from api.core.job_states import TERMINAL, JobStatus
from svfit_cli.client import files
from svfit_cli.client.base import EXIT_JOB_UNSUCCESSFUL, EXIT_OK, CliError, client_command, print_json
from svfit_cli.client.http import ApiClient, ApiError, ApiUnreachable
from svfit_cli.client.output import fields, table, when
from svfit_cli.client.progress import ProgressBar, human_duration

# How long `follow` keeps trying through a server restart before it gives up.
FOLLOW_OUTAGE_S = 120.0
# Pages of new events read per poll; a follower that fell further behind skips to the newest.
MAX_EVENT_PAGES_PER_POLL = 10


def _number_or_auto(text: str) -> float | int | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from exc
    return int(value) if value.is_integer() and "." not in text else value


def _filter_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value  # metadata values are strings: compared as typed


def _key_value(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)  # numbers, booleans and lists keep their type
    except ValueError:
        return key, raw


def _file_id(client: ApiClient, value: str | None) -> str | None:
    """A file id as is; an existing local path is uploaded first (so one command goes from JSONL to job)."""
    if value is None or value.startswith("file-") or not Path(value).is_file():
        return value
    created = files.upload(client, Path(value))
    if created["status"] == "error":
        raise CliError("invalid_training_file", f"{value}: {created.get('status_details') or ''}")
    return created["id"]


# Reinforcement's hyperparameters by their flags (dest names).
REINFORCEMENT_FLAGS = (("compute_multiplier", "compute_multiplier"), ("eval_interval", "eval_interval"),
                       ("eval_samples", "eval_samples"))


def _grader(value: str) -> dict:
    """--grader: a JSON file's path, or the grader object itself as JSON text."""
    path = Path(value)
    text = path.read_text() if path.is_file() else value
    try:
        grader = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError("invalid_parameter", f"--grader is neither a JSON file nor JSON: {exc}") from None
    if not isinstance(grader, dict):
        raise CliError("invalid_parameter", "--grader must be a JSON object (a grader)")
    return grader


def job_body(client: ApiClient, args: argparse.Namespace) -> dict:
    # Before any upload: flags that belong to another method.
    if args.beta is not None and args.method != "dpo":
        raise CliError("invalid_parameter", "--beta applies only to --method dpo")
    reinforcement_flags = [flag for flag, dest in REINFORCEMENT_FLAGS if getattr(args, dest) is not None]
    if (args.grader is not None or reinforcement_flags) and args.method != "reinforcement":
        raise CliError("invalid_parameter", "--grader, --compute-multiplier, --eval-interval and --eval-samples "
                                            "apply only to --method reinforcement")
    if args.method == "reinforcement" and args.grader is None:
        raise CliError("missing_parameter", "--method reinforcement needs --grader (a JSON file or object)")
    grader = _grader(args.grader) if args.grader is not None else None
    body: dict = {"model": args.model, "training_file": _file_id(client, args.training_file)}
    validation = _file_id(client, args.validation_file)
    if validation:
        body["validation_file"] = validation
    for key in ("suffix", "seed"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    hyperparameters = {
        name: value
        for name, value in (("n_epochs", args.epochs), ("batch_size", args.batch_size),
                            ("learning_rate_multiplier", args.lr_multiplier))
        if value is not None
    }
    if args.beta is not None:
        hyperparameters["beta"] = args.beta
    hyperparameters.update({name: getattr(args, dest) for name, dest in REINFORCEMENT_FLAGS
                            if getattr(args, dest) is not None})
    if args.method:
        # OpenAI's current shape: the hyperparameters inside the method block.
        body["method"] = {"type": args.method}
        if hyperparameters:
            body["method"][args.method] = {"hyperparameters": hyperparameters}
        if grader is not None:
            body["method"].setdefault(args.method, {})["grader"] = grader
    elif hyperparameters:
        body["hyperparameters"] = hyperparameters
    peft: dict = {"type": args.peft} if args.peft else {}
    for name in ("rank", "energy"):
        if getattr(args, name) is not None:
            peft[name] = getattr(args, name)
    if args.target_modules:
        peft["target_modules"] = (args.target_modules if args.target_modules == "all-linear"
                                  else [m for m in args.target_modules.split(",") if m])
    peft.update(dict(args.peft_option or []))
    if peft:
        body["peft"] = peft
    if args.metadata:
        body["metadata"] = {k: str(v) for k, v in args.metadata}
    return body


# --- display -------------------------------------------------------------------------------------------


def _method(job: dict) -> str:
    """The peft type ("svfit"), preceded by the training method when it is not plain supervised ("dpo/svfit")."""
    peft_type = (job.get("peft") or {}).get("type")
    method_type = (job.get("method") or {}).get("type")
    if method_type and method_type != "supervised":
        return f"{method_type}/{peft_type}" if peft_type else method_type
    return peft_type or method_type or "-"


def _method_note(job: dict) -> str:
    """What `create` says about a new job's method: `dpo/svfit, beta 0.1`."""
    beta = (job.get("hyperparameters") or {}).get("beta")
    return _method(job) + (f", beta {beta:g}" if isinstance(beta, (int, float)) else "")


def _progress(job: dict) -> str:
    progress = job.get("progress") or {}
    total = progress.get("total_steps")
    return f"{progress.get('step', 0)}/{total}" if total else "-"


def _summary(job: dict) -> list[tuple[str, object]]:
    progress = job.get("progress") or {}
    error = job.get("error")
    return [
        ("id", job["id"]), ("status", job["status"]), ("model", job["model"]),
        ("fine_tuned_model", job.get("fine_tuned_model")), ("method", _method(job)),
        ("progress", _progress(job)), ("eta", human_duration(progress.get("seconds_remaining"))
                                       if job["status"] == JobStatus.RUNNING else None),
        ("training_file", job["training_file"]), ("validation_file", job.get("validation_file")),
        ("hyperparameters", json.dumps(job.get("hyperparameters"))), ("peft", json.dumps(job.get("peft"))),
        ("created", when(job["created_at"])), ("finished", when(job.get("finished_at"))),
        ("error", f"{error['code']}: {error['message']}" if error else None),
    ]


# --- follow --------------------------------------------------------------------------------------------


class EventReader:
    """Reads a job's events oldest-first, a poll at a time, from the newest-first cursor list.

    Only the events newer than the last one seen are read: pages are walked from the newest until the
    last seen id turns up.
    """

    def __init__(self, client: ApiClient, job_id: str):
        self._client = client
        self._path = f"fine_tuning/jobs/{job_id}/events"
        self._newest: str | None = None

    def new_events(self) -> list[dict]:
        fresh: list[dict] = []
        after = None
        for _ in range(MAX_EVENT_PAGES_PER_POLL):
            page = self._client.get(self._path, limit=100, after=after)
            for event in page["data"]:
                if event["id"] == self._newest:
                    return self._advance(fresh)
                fresh.append(event)
            # The first read only needs the latest page: a follower shows what happens from now on.
            if not page.get("has_more") or not page["data"] or self._newest is None:
                break
            after = page["data"][-1]["id"]
        return self._advance(fresh)

    def _advance(self, fresh: list[dict]) -> list[dict]:
        if fresh:
            self._newest = fresh[0]["id"]
        return list(reversed(fresh))


def _bar_note(job: dict, loss: float | None) -> str:
    progress = job.get("progress") or {}
    parts = [job["status"]]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if job["status"] == JobStatus.RUNNING:
        parts.append(f"ETA {human_duration(progress.get('seconds_remaining'))}")
    elif job["status"] == JobStatus.QUEUED and job.get("queue_position"):
        parts.append(f"#{job['queue_position']} in queue")
    return " ".join(parts)


def follow(client: ApiClient, job_id: str, *, interval: float, json_output: bool) -> int:
    """Follow a job to its end; 0 if it succeeded, EXIT_JOB_UNSUCCESSFUL otherwise."""
    events = EventReader(client, job_id)
    bar = ProgressBar(job_id)
    loss: float | None = None
    outage_since: float | None = None
    while True:
        try:
            job = client.get(f"fine_tuning/jobs/{job_id}")
            fresh = events.new_events()
            outage_since = None
        except (ApiUnreachable, ApiError) as exc:
            # A restarting server (or a proxy's 502) is not the job failing: wait a while before giving up.
            if isinstance(exc, ApiError) and exc.status < 500:
                raise
            outage_since = outage_since or time.monotonic()
            if time.monotonic() - outage_since > FOLLOW_OUTAGE_S:
                raise
            bar.message(f"(the API is not answering: {exc}; retrying)")
            time.sleep(interval)
            continue
        for event in fresh:
            data = event.get("data") or {}
            if event["type"] == "metrics":
                loss = data.get("train_loss", loss)
            else:
                level = "" if event["level"] == "info" else f"[{event['level']}] "
                bar.message(f"{time.strftime('%H:%M:%S', time.localtime(event['created_at']))} {level}{event['message']}")
        progress = job.get("progress") or {}
        bar.update(progress.get("step") or 0, progress.get("total_steps"), _bar_note(job, loss))
        if job["status"] in TERMINAL:
            bar.close(_bar_note(job, loss))
            break
        time.sleep(interval)

    if json_output:
        print_json(job)
    if job["status"] == JobStatus.SUCCEEDED:
        if not json_output:
            print(job["fine_tuned_model"], flush=True)
        return EXIT_OK
    error = job.get("error") or {"code": "job_cancelled", "message": f"Job {job_id} was cancelled."}
    print(f"error: {error['code']}: {error['message']}", file=sys.stderr, flush=True)
    return EXIT_JOB_UNSUCCESSFUL


# --- commands ------------------------------------------------------------------------------------------


@client_command
def cmd_create(client: ApiClient, args: argparse.Namespace) -> int:
    body = job_body(client, args)
    # One key per invocation: a retry of this request after a lost answer returns the same job, not a twin.
    job = client.post("fine_tuning/jobs", body, headers={"Idempotency-Key": args.idempotency_key or str(uuid.uuid4())})
    # On stderr: stdout carries only the id (or the JSON), for scripts.
    print(f"created {job['id']} ({_method_note(job)})", file=sys.stderr, flush=True)
    if args.follow:
        return follow(client, job["id"], interval=args.interval, json_output=args.json_output)
    if args.json_output:
        print_json(job)
    else:
        print(job["id"])
    return EXIT_OK


@client_command
def cmd_list(client: ApiClient, args: argparse.Namespace) -> None:
    jobs = []
    # The server filters by metadata (every pair must match), so paging stays exact.
    metadata = {f"metadata[{key}]": value for key, value in args.metadata or []}
    for job in client.pages("fine_tuning/jobs", limit=min(args.limit, 100) if not args.all else 100, **metadata):
        if args.status and job["status"] != args.status:
            continue
        jobs.append(job)
        if not args.all and len(jobs) >= args.limit:
            break
    if args.json_output:
        print_json(jobs)
        return
    table(["ID", "STATUS", "METHOD", "PROGRESS", "CREATED", "MODEL"],
          [[j["id"], j["status"], _method(j), _progress(j), when(j["created_at"]), j.get("fine_tuned_model") or j["model"]]
           for j in jobs])


@client_command
def cmd_get(client: ApiClient, args: argparse.Namespace) -> None:
    job = client.get(f"fine_tuning/jobs/{args.job_id}")
    if args.json_output:
        print_json(job)
    else:
        fields(_summary(job))


@client_command
def cmd_follow(client: ApiClient, args: argparse.Namespace) -> int:
    return follow(client, args.job_id, interval=args.interval, json_output=args.json_output)


def _transition(action: str):
    @client_command
    def run(client: ApiClient, args: argparse.Namespace) -> None:
        job = client.post(f"fine_tuning/jobs/{args.job_id}/{action}")
        if args.json_output:
            print_json(job)
        else:
            print(f"{job['id']} {job['status']}")

    run.__name__ = f"cmd_{action}"
    return run


def add_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    jobs = commands.add_parser("jobs", help="fine-tuning jobs (client: talks to a running service)")
    sub = jobs.add_subparsers(dest="jobs_command", required=True)

    create = sub.add_parser("create", parents=[common], help="create a job; prints its id")
    create.add_argument("--model", required=True, help="base model id (see GET /v1/models)")
    create.add_argument("--training-file", required=True, help="a file id, or a local JSONL path to upload first")
    create.add_argument("--validation-file", help="a file id, or a local JSONL path to upload first")
    create.add_argument("--suffix")
    create.add_argument("--seed", type=int)
    create.add_argument("--epochs", type=_number_or_auto, help="n_epochs (a number or 'auto')")
    create.add_argument("--batch-size", type=_number_or_auto)
    create.add_argument("--lr-multiplier", type=_number_or_auto, help="learning_rate_multiplier")
    create.add_argument("--method", choices=["supervised", "dpo", "reinforcement"],
                        help="training method (default supervised); dpo trains on a preference file, "
                             "reinforcement on a prompt file with --grader")
    create.add_argument("--beta", type=_number_or_auto, help="DPO's beta (a number or 'auto'); with --method dpo")
    create.add_argument("--grader", help="reinforcement's grader: a JSON file, or the JSON object itself")
    create.add_argument("--compute-multiplier", type=_number_or_auto,
                        help="reinforcement: scales the answers sampled per prompt (4 at 1)")
    create.add_argument("--eval-interval", type=_number_or_auto, help="reinforcement: steps between evaluations")
    create.add_argument("--eval-samples", type=_number_or_auto,
                        help="reinforcement: answers sampled per validation prompt")
    create.add_argument("--peft", choices=["svfit", "lora", "full"], help="method (server default: svfit)")
    create.add_argument("--rank", type=int)
    create.add_argument("--energy", type=float)
    create.add_argument("--target-modules", help="'all-linear' or a comma-separated list of module names")
    create.add_argument("--peft-option", type=_key_value, action="append", metavar="KEY=VALUE",
                        help="any other peft option, e.g. checkpoint_every=50 (repeatable; values parsed as JSON)")
    create.add_argument("--metadata", type=_key_value, action="append", metavar="KEY=VALUE")
    create.add_argument("--idempotency-key", help="default: a fresh one per invocation")
    create.add_argument("--follow", action="store_true", help="then follow it to the end (like `jobs follow`)")
    create.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --follow")
    create.set_defaults(func=cmd_create)

    list_cmd = sub.add_parser("list", parents=[common], help="list jobs, newest first")
    list_cmd.add_argument("--status", choices=[status.value for status in JobStatus])
    list_cmd.add_argument("--metadata", type=_filter_pair, action="append", metavar="KEY=VALUE",
                          help="only jobs whose metadata holds KEY=VALUE (repeatable)")
    list_cmd.add_argument("--limit", type=int, default=20)
    list_cmd.add_argument("--all", action="store_true", help="every job, not just the newest --limit")
    list_cmd.set_defaults(func=cmd_list)

    get = sub.add_parser("get", parents=[common], help="one job")
    get.add_argument("job_id")
    get.set_defaults(func=cmd_get)

    follow_cmd = sub.add_parser("follow", parents=[common],
                                help="live progress until the job ends; prints the model id (exit 4 unless it succeeded)")
    follow_cmd.add_argument("job_id")
    follow_cmd.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    follow_cmd.set_defaults(func=cmd_follow)

    for action, text in (("cancel", "cancel a job"), ("pause", "pause a running or queued job (it checkpoints)"),
                         ("resume", "resume a paused job")):
        command = sub.add_parser(action, parents=[common], help=text)
        command.add_argument("job_id")
        command.set_defaults(func=_transition(action))
