"""Service benchmark: GET-job latency under concurrency, dispatch latency, upload throughput and memory.

One command: `python -m benchmarks.service [--quick]`. It starts real `svfit` processes on loopback:
- `api_get_job`: p50/p99 of `GET /v1/fine_tuning/jobs/{id}` from 50 concurrent clients, on SQLite and on
  Postgres, against the same server's `GET /healthz` (no database) measured in the same run as baseline.
  Each arm also reports the API process's CPU per request (all its threads, from /proc), a figure that
  the other work on a shared machine disturbs far less than wall-clock tails.
- `dispatch`: seconds from the create call returning to the job reading `running`, with an idle worker,
  for Redis + Postgres (`svfit api` + `svfit worker`) and for the embedded default (`svfit serve`).
- `upload`: throughput and the API process's resident-memory growth while a large JSONL streams in
  (200 MB; 20 MB with --quick).
Writes benchmarks/results/service.json (service_quick.json with --quick). Targets (2 cores): p99 < 25 ms,
dispatch < 1 s Redis and < 2 s embedded, upload memory growth < 64 MB.

The load generator is kept light so that it measures the server, not itself: on two cores it competes
with the server for CPU. Each client is one keep-alive HTTP/1.1 connection driven by a few lines of
asyncio streams (under 0.1 ms of CPU a request, where an `httpx.AsyncClient` takes ~1 ms: 50 of those
firing together queued behind each other in the client process before a byte reached the server).
Connections are opened and used once before the clock starts, as a client that has been polling holds
them. Polling clients start at random (seeded) phases within their interval, as independent pollers
do, rather than all 50 in the same millisecond every interval, which measured a synchronized burst.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from api.core.job_states import JobStatus
from benchmarks.common import REPO_ROOT, format_table, log, quantile, write_result

SVFIT = [sys.executable, "-m", "svfit_cli"]
CLIENTS = 50
POLL_INTERVAL_S = 0.5  # a client polling job status twice a second: 100 requests/s from 50 clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_chat_model(models_dir: Path) -> None:
    """A 2-layer random Llama with a chat template, as base model `tiny-llama` (no download)."""
    from testkit.tiny_models import build_tiny

    build_tiny("llama", "causal", models_dir).rename(models_dir / "tiny-llama")


def postgres_database():
    """A throwaway database; `running_service` migrates it with `svfit migrate`."""
    from testkit.databases import fresh_postgres_database

    return fresh_postgres_database("svfit_bench", migrate=False)


@contextmanager
def running_service(workdir: Path, models_dir: Path, *, database_url: str | None, broker_url: str | None,
                    roles: list[list[str]]):
    """Start `svfit` processes (each `roles` entry is a sub-command line); yield (base_url, {role: pid})."""
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(dir=workdir))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVFIT_")}
    env.update(SVFIT_DATA_DIR=str(data_dir), SVFIT_MODELS_DIR=str(models_dir), SVFIT_MIN_TRAINING_EXAMPLES="1",
               SVFIT_WORKER_QUEUE=f"bench-{secrets.token_hex(3)}", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    if database_url:
        env["SVFIT_DATABASE_URL"] = database_url
    if broker_url:
        env["SVFIT_BROKER_URL"] = broker_url
    if database_url:
        subprocess.run([*SVFIT, "migrate"], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    procs = {}
    for role in roles:
        args = [a.replace("{port}", str(port)).replace("{queue}", env["SVFIT_WORKER_QUEUE"]) for a in role]
        log_file = (data_dir / f"{role[0]}.log").open("ab")
        procs[role[0]] = subprocess.Popen([*SVFIT, *args], cwd=REPO_ROOT, env=env, stdout=log_file,
                                          stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
                raise RuntimeError(f"service did not start; logs in {data_dir}")
            time.sleep(0.2)
        if any(role[0] in {"worker", "serve"} for role in roles):
            time.sleep(3)  # let the worker finish booting so "idle worker" means idle, not starting
        yield base_url, {name: p.pid for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


CHAT_LINE = json.dumps({"messages": [{"role": "user", "content": "hello world"},
                                     {"role": "assistant", "content": "hello . how are you ?"}]}) + "\n"


def upload_chat_file(client: httpx.Client, lines: int = 8) -> str:
    response = client.post("/v1/files", data={"purpose": "fine-tune"},
                           files={"file": ("train.jsonl", (CHAT_LINE * lines).encode(), "application/jsonl")})
    response.raise_for_status()
    return response.json()["id"]


def create_job(client: httpx.Client, file_id: str, n_epochs: int = 1) -> str:
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": file_id, "hyperparameters": {"n_epochs": n_epochs, "batch_size": 2}})
    response.raise_for_status()
    return response.json()["id"]


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that sends GETs and reads each whole response (Content-Length)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    async def get(self, path: str) -> int:
        """The response's status; the body is read and dropped."""
        assert self._reader is not None and self._writer is not None
        self._writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
        head = await self._reader.readuntil(b"\r\n\r\n")
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"response to {path} has no Content-Length: {head!r}")
        await self._reader.readexactly(length)
        return int(head.split(b" ", 2)[1])


async def latency_under_load(base_url: str, path: str, clients: int, requests_per_client: int,
                             interval_s: float = 0.0, seed: int = 0) -> list[float]:
    """Each of `clients` connections issues its requests back to back (`interval_s` 0: a saturating closed
    loop, where latency is mostly queueing behind the other 49), or one every `interval_s` from a random
    phase (a polling client); returns every request's seconds."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    samples: list[float] = []
    errors: list[str] = []
    phases = random.Random(seed)

    async def one_client(connection: HttpConnection, phase_s: float) -> None:
        await asyncio.sleep(phase_s)
        for _ in range(requests_per_client):
            start = time.perf_counter()
            try:
                status = await connection.get(path)
            except (asyncio.IncompleteReadError, ConnectionError):
                # A keep-alive connection the server closed as we reused it: counted, retried once.
                errors.append(path)
                connection.close()
                await connection.open()
                status = await connection.get(path)
            samples.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"GET {path}: HTTP {status}")
            if interval_s:
                await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - start)))

    connections = [HttpConnection(host, int(port)) for _ in range(clients)]
    try:
        for connection in connections:  # open and warm every connection (and the route) off the clock
            await connection.open()
            await connection.get(path)
        await asyncio.gather(*(one_client(c, phases.uniform(0, interval_s)) for c in connections))
    finally:
        for connection in connections:
            connection.close()
    if errors:
        log(f"{path}: {len(errors)} requests retried on a fresh connection")
    return samples


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid`, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_get_job(workdir: Path, models_dir: Path, quick: bool) -> list[dict]:
    per_client = 10 if quick else 40
    arms = []
    with postgres_database() as pg_url:
        for backend, db_url in (("sqlite", _sqlite_url(workdir)), ("postgres", pg_url)):
            # The API alone: no worker, so the job stays queued and every GET reads the same row.
            with running_service(workdir, models_dir, database_url=db_url, broker_url=None,
                                 roles=[["api", "--host", "127.0.0.1", "--port", "{port}"]]) as (base_url, pids):
                with httpx.Client(base_url=base_url, timeout=30) as client:
                    job_id = create_job(client, upload_chat_file(client))
                for name, path, interval in (
                    (f"healthz_{backend}", "/healthz", 0.0),
                    (f"get_job_{backend}", f"/v1/fine_tuning/jobs/{job_id}", 0.0),
                    (f"healthz_{backend}_polling", "/healthz", POLL_INTERVAL_S),
                    (f"get_job_{backend}_polling", f"/v1/fine_tuning/jobs/{job_id}", POLL_INTERVAL_S),
                ):
                    cpu_before = _cpu_seconds(pids["api"])
                    samples = asyncio.run(latency_under_load(base_url, path, CLIENTS, per_client, interval))
                    cpu_ms = 1000 * (_cpu_seconds(pids["api"]) - cpu_before) / len(samples)
                    arms.append({"name": name, "requests": len(samples), "clients": CLIENTS,
                                 "interval_s": interval,
                                 "p50_ms": 1000 * quantile(samples, 0.5), "p99_ms": 1000 * quantile(samples, 0.99),
                                 "max_ms": 1000 * max(samples), "server_cpu_ms_per_request": cpu_ms,
                                 "load_avg_1min": round(os.getloadavg()[0], 2)})
                    log(f"{name}: p50 {arms[-1]['p50_ms']:.1f} ms, p99 {arms[-1]['p99_ms']:.1f} ms, "
                        f"server CPU {cpu_ms:.2f} ms/request, load {arms[-1]['load_avg_1min']}")
    return arms


def _sqlite_url(workdir: Path) -> str:
    return f"sqlite:///{Path(tempfile.mkdtemp(dir=workdir)) / 'bench.db'}"


def measure_dispatch(base_url: str, jobs: int) -> list[float]:
    """Create a job on an idle worker, time until it reads `running`, cancel it, wait for the worker to be idle."""
    latencies = []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        file_id = upload_chat_file(client)
        for _ in range(jobs):
            job_id = create_job(client, file_id, n_epochs=50)
            start = time.perf_counter()
            while client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] != JobStatus.RUNNING:
                if time.perf_counter() - start > 60:
                    raise TimeoutError(f"job {job_id} never started")
                time.sleep(0.01)
            latencies.append(time.perf_counter() - start)
            client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
            while client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] != JobStatus.CANCELLED:
                time.sleep(0.05)
            time.sleep(1.0)  # the worker acks and returns to polling: "idle" again
    return latencies


def bench_dispatch(workdir: Path, models_dir: Path, quick: bool) -> list[dict]:
    jobs = 3 if quick else 8
    arms = []
    with postgres_database() as pg_url:
        setups = (
            ("dispatch_redis", dict(database_url=pg_url, broker_url=f"redis://127.0.0.1:6379/{secrets.randbelow(8) + 8}",
                                    roles=[["api", "--host", "127.0.0.1", "--port", "{port}"],
                                           ["worker", "--queue", "{queue}"]])),
            ("dispatch_embedded", dict(database_url=None, broker_url=None,
                                       roles=[["serve", "--host", "127.0.0.1", "--port", "{port}"]])),
        )
        for name, kwargs in setups:
            with running_service(workdir, models_dir, **kwargs) as (base_url, _):
                samples = measure_dispatch(base_url, jobs)
            arms.append({"name": name, "jobs": jobs, "p50_s": quantile(samples, 0.5), "max_s": max(samples)})
            log(f"{name}: p50 {arms[-1]['p50_s']:.3f} s, max {arms[-1]['max_s']:.3f} s")
    return arms


def _proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def bench_upload(workdir: Path, models_dir: Path, quick: bool) -> list[dict]:
    target_mb = 20 if quick else 200
    path = workdir / "big.jsonl"
    line = json.dumps({"text": "a moderately long sentence about a movie that was good " * 2, "label": 1}) + "\n"
    with path.open("w") as fh:
        fh.write(line * (target_mb * 1024 * 1024 // len(line)))
    size = path.stat().st_size
    arms = []
    with running_service(workdir, models_dir, database_url=_sqlite_url(workdir), broker_url=None,
                         roles=[["api", "--host", "127.0.0.1", "--port", "{port}"]]) as (base_url, pids):
        pid = pids["api"]
        rss_cold = _proc_kb(pid, "VmRSS")
        # A small upload first: the validator's first use imports the training library (torch), a one-time
        # cost that is reported separately from what an upload itself holds.
        with httpx.Client(base_url=base_url, timeout=60) as client:
            upload_chat_file(client)
        rss_before = _proc_kb(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        start = time.perf_counter()
        with path.open("rb") as fh, httpx.Client(base_url=base_url, timeout=600) as client:
            response = client.post("/v1/files", data={"purpose": "fine-tune"},
                                   files={"file": ("big.jsonl", fh, "application/jsonl")})
        seconds = time.perf_counter() - start
        response.raise_for_status()
        growth_mb = (_proc_kb(pid, "VmHWM") - rss_before) / 1024
    arms.append({"name": f"upload_{target_mb}mb", "bytes": size, "seconds": seconds,
                 "throughput_mb_s": size / 1024 / 1024 / seconds, "rss_growth_mb": growth_mb,
                 "first_upload_import_mb": (rss_before - rss_cold) / 1024,
                 "file_status": response.json().get("status")})
    log(f"upload {size / 1e6:.0f} MB: {arms[-1]['throughput_mb_s']:.1f} MB/s, RSS growth {growth_mb:.1f} MB")
    path.unlink()
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and jobs, a 20 MB upload")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models_dir = workdir / "models"
        models_dir.mkdir()
        build_tiny_chat_model(models_dir)
        arms = bench_get_job(workdir, models_dir, args.quick)
        arms += bench_dispatch(workdir, models_dir, args.quick)
        arms += bench_upload(workdir, models_dir, args.quick)

    by_name = {a["name"]: a for a in arms}
    for backend in ("sqlite", "postgres"):
        for mode in ("", "_polling"):
            get, base = by_name[f"get_job_{backend}{mode}"], by_name[f"healthz_{backend}{mode}"]
            get["p99_ratio_to_healthz"] = get["p99_ms"] / base["p99_ms"]
    targets = {"get_job_p99_ms": 25, "dispatch_redis_s": 1.0, "dispatch_embedded_s": 2.0, "upload_rss_growth_mb": 64}
    print(format_table(["arm", "p50", "p99 / max", "note"], [
        *[(a["name"], f"{a['p50_ms']:.1f} ms", f"{a['p99_ms']:.1f} ms",
           f"{a['requests']} requests, server CPU {a['server_cpu_ms_per_request']:.2f} ms each")
          for a in arms if "p50_ms" in a],
        *[(a["name"], f"{a['p50_s']:.3f} s", f"{a['max_s']:.3f} s", f"{a['jobs']} jobs") for a in arms if "p50_s" in a],
        *[(a["name"], f"{a['throughput_mb_s']:.1f} MB/s", f"+{a['rss_growth_mb']:.1f} MB RSS", a["file_status"])
          for a in arms if "throughput_mb_s" in a],
    ]))
    path = write_result("service_quick" if args.quick else "service",
                        {"quick": args.quick, "targets": targets, "arms": arms}, started)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
