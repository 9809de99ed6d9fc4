"""The `svfit` command: run the service (`serve`, `api`, `worker`), migrate its database, manage API keys.

`serve` is the one-command local mode: the HTTP API in this process plus one worker subprocess running the
same task code as a production worker, sharing the data directory (SQLite + filesystem queue by default),
and started again if it dies (worker/supervisor.py). `worker` on a GPU host runs one supervised worker
process per GPU, each pinned to its GPU.
The client commands (`jobs`, `files`, `artifacts`, `chat`) live in api/client_cli and use the HTTP API only.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import sys
import threading


def _redacted(url: str) -> str:
    from sqlalchemy import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a non-SQLAlchemy URL (a broker)
        return url.split("@")[-1] if "@" in url else url


def _banner(mode: str) -> None:
    from api.core.settings import get_settings

    settings = get_settings()
    auth = "required (Authorization: Bearer <key>)" if settings.auth_required else "off (bound to loopback)"
    queue = f"filesystem ({settings.queue_dir})" if settings.embedded_queue else _redacted(settings.broker_url or "")
    print(f"svfit {mode}: http://{settings.host}:{settings.port}/v1", flush=True)
    print(f"  auth:      {auth}", flush=True)
    print(f"  data:      {settings.data_dir}", flush=True)
    if settings.storage == "s3":
        store = f"s3://{settings.s3_bucket}/{settings.s3_prefix}".rstrip("/")
        endpoint = settings.s3_endpoint_url or "AWS S3"
        print(f"  store:     {store} at {endpoint} (cache {settings.store_dir})", flush=True)
    print(f"  database:  {_redacted(settings.database_url or '')}", flush=True)
    print(f"  queue:     {queue} [{settings.worker_queue}]", flush=True)
    print(f"  models:    {settings.models_dir}", flush=True)


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    # uvicorn handles SIGTERM itself, then re-raises it once the server has stopped; with the default
    # action that would kill us before `finally` stops the worker, so turn it into a normal exit.
    raise SystemExit(0)


def _quiet_progress_bars() -> None:
    """Server processes write logs, not terminals: a model load's progress bar (GGUF dequantisation, weight
    loading) became ~25 log lines of carriage-return frames, each a WARNING in the worker's log. Set before
    tqdm is first imported (it reads its TQDM_* settings once); the worker children inherit it."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars follow this switch


def _store_usable(mode: str) -> bool:
    """Probe the configured store once (an S3 bucket: HeadBucket); on failure say which setting to fix."""
    from api.core.settings import get_settings
    from api.core.storage import StorageUnavailable, storage_for

    try:
        storage_for(get_settings())
    except StorageUnavailable as exc:
        print(f"svfit {mode}: {exc}", file=sys.stderr)
        return False
    return True


def worker_command(queue: str, loglevel: str) -> list[str]:
    """The command line of one worker process (what `serve` and `worker --concurrency N` / `--gpus`
    supervise). `--gpus ""`: the child is one process on the devices its environment shows, never a
    supervisor of its own."""
    return [sys.executable, "-m", "svfit_cli", "worker", "--queue", queue, "--loglevel", loglevel, "--gpus", ""]


def parse_gpus(text: str) -> list[str]:
    """`--gpus`: distinct integer GPU ids, comma-separated ("0,1,3"), as CUDA_VISIBLE_DEVICES takes them; ""
    for none."""
    if not text.strip():
        return []
    ids = [part.strip() for part in text.split(",")]
    if not all(i.isascii() and i.isdigit() for i in ids) or len({int(i) for i in ids}) != len(ids):
        raise argparse.ArgumentTypeError(f"expected distinct GPU ids such as 0,1,3 (or '' for none), got {text!r}")
    return [str(int(i)) for i in ids]


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {text!r}")
    return value


def visible_gpus() -> list[str]:
    """Every GPU this process sees, by the ids a child's CUDA_VISIBLE_DEVICES must name: the entries of our
    own CUDA_VISIBLE_DEVICES when it is set (a child's value replaces it rather than indexing into it), else
    0..n-1. Empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        return [entry.strip() for entry in inherited.split(",")][:count]
    return [str(i) for i in range(count)]


def worker_slots(gpus: list[str], concurrency: int | None) -> list[tuple[str, dict[str, str]]]:
    """``(label, environment)`` of each worker process: ``concurrency`` of them (default: one per GPU, else
    one), dealt round-robin over ``gpus``; each on a GPU sees that GPU only (as its cuda:0)."""
    total = concurrency or len(gpus) or 1
    slots = []
    for i in range(total):
        label = f"worker {i + 1}/{total}"
        if gpus:
            gpu = gpus[i % len(gpus)]
            slots.append((f"{label} on GPU {gpu}", {"CUDA_VISIBLE_DEVICES": gpu}))
        else:
            slots.append((label, {}))
    return slots


def enqueue_job(job_id: str) -> None:
    """What the API calls to hand a committed job to the workers. Imported on first use: Celery is not
    needed until the first job is created."""
    from worker.dispatch import enqueue_job as enqueue

    enqueue(job_id)


# --- commands ------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    _quiet_progress_bars()
    import uvicorn

    from api.core.migrations import upgrade_to_head
    from api.core.settings import get_settings
    from api.main import create_app
    from worker.supervisor import SupervisedWorker

    # The in-process replica and the API share a token made up for this run, unless one is configured.
    os.environ.setdefault("SVFIT_SERVING_TOKEN", secrets.token_urlsafe(32))
    settings = get_settings()
    if not _store_usable("serve"):
        return 2
    _banner("serve")
    # Migrate before the worker starts: its reaper reads the jobs table as soon as it is ready.
    upgrade_to_head()
    worker = SupervisedWorker(worker_command(settings.worker_queue, args.loglevel)).start()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    replica = None
    try:
        from serving.embedded import ReplicaThread

        replica = ReplicaThread(settings).start()
        print(f"  serving:   in-process replica at {replica.url}", flush=True)
        uvicorn.run(create_app(dispatch=enqueue_job, auto_migrate=True), host=settings.host, port=settings.port,
                    log_level=args.loglevel)
    finally:
        if replica is not None:
            replica.stop()
        print("stopping the worker...", flush=True)
        worker.stop()
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    _quiet_progress_bars()
    import uvicorn

    from api.core.db import get_engine
    from api.core.migrations import DatabaseNotMigrated, ensure_up_to_date
    from api.core.settings import get_settings
    from api.main import create_app

    settings = get_settings()
    try:
        ensure_up_to_date(get_engine(), auto_migrate=False)
    except DatabaseNotMigrated as exc:
        print(f"svfit api: {exc}", file=sys.stderr)
        return 2
    if not _store_usable("api"):
        return 2
    if not settings.serving_token:
        print("svfit api: set SVFIT_SERVING_TOKEN (the secret the serving replicas require) to route inference",
              file=sys.stderr)
        return 2
    _banner("api")
    uvicorn.run(create_app(dispatch=enqueue_job, auto_migrate=False), host=settings.host, port=settings.port, log_level=args.loglevel)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    _quiet_progress_bars()
    from api.core.settings import get_settings
    from worker.supervisor import SupervisedWorker, stop_all

    settings = get_settings()
    if not _store_usable("worker"):
        return 2
    gpus = args.gpus if args.gpus is not None else visible_gpus()
    slots = worker_slots(gpus, args.concurrency)
    if gpus or len(slots) > 1:
        # One job per process (training owns the device and its memory): N slots are N worker processes,
        # each restarted if it dies, so a crash does not quietly cost a slot. A process pinned to one GPU
        # cannot spill onto, or be crowded by, another job's.
        command = worker_command(settings.worker_queue, args.loglevel)
        workers = [SupervisedWorker(command, label=label, env=env).start() for label, env in slots]
        stop = threading.Event()

        def _stop(_signum: int, _frame: object) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        stop.wait()
        print("stopping the workers...", flush=True)
        stop_all(workers)
        return 0

    from worker.consumer import run_consumer

    run_consumer(settings.worker_queue, args.loglevel)
    return 0


def _advertised_url(host: str, port: int, given: str | None) -> str:
    """How the API reaches this replica: `--advertise-url`, else the bound address (this host's name when
    bound to every interface)."""
    if given:
        return given.rstrip("/")
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"http://{host}:{port}"


def cmd_serving(args: argparse.Namespace) -> int:
    _quiet_progress_bars()
    import uvicorn

    from api.core.migrations import DatabaseNotMigrated
    from api.core.settings import get_settings
    from serving.app import MissingServingToken, create_serving_app

    if args.device:
        os.environ["SVFIT_INFERENCE_DEVICE"] = args.device
        get_settings.cache_clear()
    settings = get_settings()
    if not _store_usable("serving"):
        return 2
    host = args.host or "127.0.0.1"
    url = _advertised_url(host, args.port, args.advertise_url)
    try:
        app = create_serving_app(settings, advertise_url=url)
    except (MissingServingToken, DatabaseNotMigrated) as exc:
        print(f"svfit serving: {exc}", file=sys.stderr)
        return 2
    print(f"svfit serving: {url} (device {settings.inference_device}, models {settings.models_dir})", flush=True)
    uvicorn.run(app, host=host, port=args.port, log_level=args.loglevel)
    return 0


def cmd_serving_register(args: argparse.Namespace) -> int:
    from api.core.settings import get_settings
    from serving.heartbeat import Heartbeat
    from serving.registrar import ExternalEngine

    settings = get_settings()
    external = ExternalEngine(settings, args.url, args.base, args.engine, args.max_loras, args.max_lora_rank)
    heartbeat = Heartbeat(settings, external.describe)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    print(f"svfit serving register: {args.engine} at {external.url} for {args.base}; beating while it answers",
          flush=True)
    heartbeat.start()  # a first beat now if it answers; the loop keeps trying when it does not
    stop.wait()
    heartbeat.stop()
    return 0


def cmd_migrate(_args: argparse.Namespace) -> int:
    from api.core.migrations import upgrade_to_head
    from api.core.settings import get_settings

    upgrade_to_head()
    print(f"database at head: {_redacted(get_settings().database_url or '')}")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from api.core.db import session_scope
    from api.services.keys import create_api_key

    with session_scope() as session:
        org_id, key = create_api_key(session, args.org)
    print(f"organization: {org_id}")
    print(f"api key:      {key}")
    print("Store this key now: it is not shown again.")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from api.core.db import session_scope
    from api.services.keys import revoke_api_key

    with session_scope() as session:
        revoked = revoke_api_key(session, args.key)
    if not revoked:
        print("svfit keys revoke: no live key matches", file=sys.stderr)
        return 1
    print("revoked")
    return 0




def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `serve`, `api`, `worker`, `serving`, `migrate` and `keys` to the `svfit` sub-command table."""

    def server_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--host", help="bind address (default 127.0.0.1; auth is off only on loopback)")
        sub.add_argument("--port", type=int, help="port (default 8000)")
        sub.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])

    serve = commands.add_parser("serve", help="API and one local worker (embedded mode)")
    server_options(serve)
    serve.add_argument("--queue", help="worker queue / device class (default: $SVFIT_WORKER_QUEUE or cpu)")
    serve.set_defaults(func=cmd_serve)

    api = commands.add_parser("api", help="the HTTP API only (the database must be migrated)")
    server_options(api)
    api.set_defaults(func=cmd_api)

    worker = commands.add_parser("worker", help="a job worker")
    worker.add_argument("--queue", help="queue to consume, by device class: gpu or cpu (default: $SVFIT_WORKER_QUEUE)")
    worker.add_argument(
        "--concurrency", type=_at_least_one,
        help="worker processes, one job each (default: one per GPU of --gpus, else 1)",
    )
    worker.add_argument(
        "--gpus", type=parse_gpus,
        help="GPU ids to spread the worker processes over, each pinned to one, e.g. 0,1,2,3 "
        "(default: every visible GPU; '' for none, one process on whatever devices it sees)",
    )
    worker.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(func=cmd_worker)

    serving = commands.add_parser(
        "serving", help="a serving replica: hosted inference on this host's device, registered for the API",
    )
    serving.add_argument("--host", help="bind address (default 127.0.0.1)")
    serving.add_argument("--port", type=int, default=8100, help="port (default 8100)")
    serving.add_argument("--device", help="cuda:0, cuda, cpu or auto (default: $SVFIT_INFERENCE_DEVICE or auto)")
    serving.add_argument("--advertise-url", help="how the API reaches this replica (default http://<host>:<port>)")
    serving.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    serving.set_defaults(func=cmd_serving)
    serving_commands = serving.add_subparsers(dest="serving_command")
    register = serving_commands.add_parser(
        "register", help="route to an operator-run vLLM or SGLang server (beats for it while it answers)",
    )
    register.add_argument("--url", required=True, help="the server's base URL, e.g. http://gpu-7:8000")
    register.add_argument("--base", required=True, help="the base model id it serves (its --served-model-name)")
    register.add_argument("--engine", default="vllm", choices=["vllm", "sglang"])
    register.add_argument("--max-lora-rank", type=_at_least_one, default=256,
                          help="its --max-lora-rank: adapters are exported at min(this, SVFIT_SERVING_LORA_RANK)")
    register.add_argument("--max-loras", type=_at_least_one, default=8,
                          help="adapters it may hold at once; the least recently used beyond are unloaded")
    register.set_defaults(func=cmd_serving_register)

    migrate = commands.add_parser("migrate", help="bring the database schema to the current revision")
    migrate.set_defaults(func=cmd_migrate)

    keys = commands.add_parser("keys", help="API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key for an organization (printed once)")
    create.add_argument("--org", required=True, help="organization name (created if new)")
    create.set_defaults(func=cmd_keys_create)
    revoke = key_commands.add_parser("revoke", help="revoke a key, by id or by the key itself")
    revoke.add_argument("key")
    revoke.set_defaults(func=cmd_keys_revoke)
