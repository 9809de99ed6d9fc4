"""Routed serving: what does the API's router cost, and do two serving replicas answer more than one?

    python -m benchmarks.routing [--quick]

Real processes, as production runs them: `svfit api` (SQLite) and `svfit serving` replicas, each replica on
one torch thread, over loopback HTTP. The load generator (this process) keeps ``--streams`` (32) chat streams
open at once, greedy, each generating exactly ``--max-tokens`` tokens (``ignore_eos``), and measures
generated tokens/s end to end and in the decode phase (tokens after each stream's first, over the time some
stream was past its first token), time to first token (the first content chunk) and request latency.

Arms:
- ``direct_1``: straight to replica 1 (with the shared token): the baseline.
- ``routed_1``: the same requests through the API (key check, rate limit, model lookup, relay) to replica 1.
- ``routed_2``: through the API with a second replica running: the router spreads the streams.
- ``isolated``: one streamed request at a time (one token), direct and routed alternating: the time the router
  adds to a request's first token when nothing else competes (the TTFT target is read here; under the
  32-stream burst the first tokens also wait for the replica's first prefill, which the API's serial
  handling of the burst spreads out, see ``burst_ttft_p50_cost_ms``).
The API process's CPU time per routed round is reported too: on this machine it comes out of the cores the
replica and the load generator use, which is most of the throughput cost measured here.

direct_1 and routed_1 alternate round by round (load from other work hits both alike); routed_2 runs after the
second replica has started and answered once. Targets: the router costs ≤ 5 % of throughput and ≤ 5 ms of
p50 time to first token; two replicas give ≥ 1.5× one; the API process's peak RSS stays under 400 MiB (it
loads no model). On this 2-core machine the API process and the load
generator share the cores with the two replicas, which bounds the last ratio below 2.

Model: SmolLM2-135M-Instruct (benchmarks.inference.build_base); --quick: its quartered random twin, fewer
tokens, one round. Results: benchmarks/results/routing.json (routing_quick.json for --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import REPO_ROOT, format_table, log, median, quantile, write_result
from benchmarks.inference import build_base, covered_seconds, questions

MODEL = "smollm2"
TARGETS = [
    # (name, metric, limit, unit, direction)
    ("router_throughput_cost", "throughput_cost", 0.05, "share", "max"),
    ("router_ttft_p50_cost", "isolated_ttft_p50_cost_ms", 5.0, "ms", "max"),
    ("two_replicas_vs_one", "two_vs_one", 1.5, "ratio", "min"),
    ("api_peak_rss", "api_peak_rss_mb", 400.0, "MiB", "max"),
]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """The `svfit` processes of one deployment over a shared data directory; stopped together."""

    def __init__(self, workdir: Path, models_dir: Path) -> None:
        self.workdir = workdir
        self.token = secrets.token_urlsafe(16)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SVFIT_")}
        self.env.update(
            SVFIT_DATA_DIR=str(workdir / "data"), SVFIT_MODELS_DIR=str(models_dir), SVFIT_SERVING_TOKEN=self.token,
            SVFIT_REQUIRE_AUTH="false", SVFIT_INFERENCE_THREADS="1", SVFIT_INFERENCE_MAX_BATCH="64",
            SVFIT_RATE_LIMIT_INFERENCE_PER_MINUTE="0", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
            PYTHONPATH=str(REPO_ROOT),
        )
        self.running: list[subprocess.Popen] = []
        subprocess.run([sys.executable, "-m", "svfit_cli", "migrate"], env=self.env, check=True, capture_output=True)

    def start(self, name: str, *args: str, ready: str) -> str:
        log_file = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "svfit_cli", *args], env=self.env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT)
        self.running.append(proc)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {(self.workdir / f'{name}.log').read_text()[-2000:]}")
            try:
                if httpx.get(ready, timeout=1).status_code == 200:
                    return ready.rsplit("/", 1)[0]
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not start")

    def replica(self, name: str) -> str:
        port = free_port()
        return self.start(name, "serving", "--port", str(port), ready=f"http://127.0.0.1:{port}/health")

    def api(self) -> str:
        port = free_port()
        return self.start("api", "api", "--port", str(port), ready=f"http://127.0.0.1:{port}/readyz")

    def peak_rss_mb(self, index: int) -> float:
        """A process's peak resident memory (VmHWM), read while it still runs."""
        for line in Path(f"/proc/{self.running[index].pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def stop(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


async def one_stream(client: httpx.AsyncClient, url: str, headers: dict, prompt: str, max_tokens: int) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    ended = time.perf_counter()
    return {"ttft": first or 0.0, "latency": ended - started, "tokens": tokens,
            "decoding": (started + (first or 0.0), ended)}


async def one_round(url: str, headers: dict, prompts: list[str], max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, headers, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    decode_tokens = sum(max(0, r["tokens"] - 1) for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "decode_tokens_per_s": decode_tokens / covered_seconds([r["decoding"] for r in results]),
            "ttfts": [r["ttft"] for r in results], "latencies": [r["latency"] for r in results]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def isolated_ttfts(targets: list[tuple[str, dict]], prompt: str, count: int) -> list[list[float]]:
    """First-token times of `count` one-token streams to each target in turn, one request in flight at a time."""
    times: list[list[float]] = [[] for _ in targets]
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(count):
            for i, (url, headers) in enumerate(targets):
                times[i].append((await one_stream(client, url, headers, prompt, 1))["ttft"])
    return times


def summarise(name: str, runs: list[dict]) -> dict[str, Any]:
    ttfts = [x for run in runs for x in run["ttfts"]]
    latencies = [x for run in runs for x in run["latencies"]]
    return {
        "name": name, "rounds": len(runs), "generated_tokens": runs[0]["tokens"],
        "tokens_per_s": median(run["tokens_per_s"] for run in runs),
        "tokens_per_s_rounds": [round(run["tokens_per_s"], 2) for run in runs],
        "decode_tokens_per_s": median(run["decode_tokens_per_s"] for run in runs),
        "ttft_p50_s": quantile(ttfts, 0.5), "ttft_p99_s": quantile(ttfts, 0.99),
        "latency_p50_s": quantile(latencies, 0.5), "latency_p99_s": quantile(latencies, 0.99),
        **({"api_cpu_s_rounds": [round(run["api_cpu_s"], 2) for run in runs],
            "api_cpu_ms_per_token": 1000 * sum(r["api_cpu_s"] for r in runs) / sum(r["tokens"] for r in runs)}
           if "api_cpu_s" in runs[0] else {}),
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    models = workdir / "models"
    models.mkdir()
    build_base(workdir, args.quick).rename(models / MODEL)
    prompts = questions(args.streams, words=12)
    deployment = Processes(workdir, models)
    try:
        first = deployment.replica("serving-1")
        api = deployment.api()
        direct = {"Authorization": f"Bearer {deployment.token}"}
        api_pid = deployment.running[1].pid

        def routed_round() -> dict:
            before = cpu_seconds(api_pid)
            result = asyncio.run(one_round(api, {}, prompts, args.max_tokens))
            return {**result, "api_cpu_s": cpu_seconds(api_pid) - before}

        for url, headers in ((first, direct), (api, {})):  # loads the model once, warms both paths
            asyncio.run(one_round(url, headers, prompts[:2], 4))
        log(f"isolated: {args.isolated} one-token requests each way, one at a time")
        isolated = asyncio.run(isolated_ttfts([(first, direct), (api, {})], prompts[0], args.isolated))
        runs: dict[str, list] = {"direct_1": [], "routed_1": [], "routed_2": []}
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}: direct_1, routed_1")
            runs["direct_1"].append(asyncio.run(one_round(first, direct, prompts, args.max_tokens)))
            runs["routed_1"].append(routed_round())
        second = deployment.replica("serving-2")
        asyncio.run(one_round(second, direct, prompts[:2], 4))  # its model loaded before it is measured
        time.sleep(3)  # a heartbeat or two: the router sees it holds the base
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}: routed_2")
            runs["routed_2"].append(routed_round())
        api_peak_rss_mb = deployment.peak_rss_mb(1)  # the API: started second, after replica 1
    finally:
        deployment.stop()
    arms = [summarise(name, rounds) for name, rounds in runs.items()]
    paired = [routed - direct for direct, routed in zip(isolated[0], isolated[1])]
    arms.append({"name": "isolated", "requests": args.isolated, "paired_cost_p50_s": quantile(paired, 0.5),
                 "direct_ttft_p50_s": quantile(isolated[0], 0.5), "routed_ttft_p50_s": quantile(isolated[1], 0.5),
                 "direct_ttft_p99_s": quantile(isolated[0], 0.99), "routed_ttft_p99_s": quantile(isolated[1], 0.99)})
    by = {arm["name"]: arm for arm in arms}
    measured = {
        "throughput_cost": 1 - by["routed_1"]["tokens_per_s"] / by["direct_1"]["tokens_per_s"],
        "decode_throughput_cost": 1 - by["routed_1"]["decode_tokens_per_s"] / by["direct_1"]["decode_tokens_per_s"],
        # Each routed request against the direct one just before it: the prefill's own noise cancels.
        "isolated_ttft_p50_cost_ms": 1000 * by["isolated"]["paired_cost_p50_s"],
        "burst_ttft_p50_cost_ms": 1000 * (by["routed_1"]["ttft_p50_s"] - by["direct_1"]["ttft_p50_s"]),
        "two_vs_one": by["routed_2"]["tokens_per_s"] / by["routed_1"]["tokens_per_s"],
        "api_peak_rss_mb": api_peak_rss_mb,
    }
    targets = [
        {"name": name, "value": round(measured[metric], 4), "limit": limit, "unit": unit,
         "met": measured[metric] <= limit if direction == "max" else measured[metric] >= limit}
        for name, metric, limit, unit, direction in TARGETS
    ]
    return {"config": {"quick": args.quick, "streams": args.streams, "max_tokens": args.max_tokens,
                       "rounds": args.rounds, "model": "SmolLM2-135M quartered (random)" if args.quick
                       else "SmolLM2-135M-Instruct", "replica_threads": 1},
            "arms": arms, "ratios": measured, "targets": targets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--isolated", type=int, default=50, help="one-at-a-time requests each way (TTFT cost)")
    args = parser.parse_args(argv)
    args.max_tokens = args.max_tokens or (16 if args.quick else 64)
    args.rounds = args.rounds or (1 if args.quick else 3)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="svfit-routing-") as tmp:
        payload = run(args, Path(tmp))
    streams = [a for a in payload["arms"] if a["name"] != "isolated"]
    print(format_table(
        ["arm", "tokens/s", "decode tok/s", "ttft p50 ms", "ttft p99 ms", "latency p50 s", "latency p99 s",
         "API CPU ms/token"],
        [[a["name"], a["tokens_per_s"], a["decode_tokens_per_s"], 1000 * a["ttft_p50_s"], 1000 * a["ttft_p99_s"], a["latency_p50_s"],
          a["latency_p99_s"], a.get("api_cpu_ms_per_token", "-")] for a in streams],
    ))
    iso = next(a for a in payload["arms"] if a["name"] == "isolated")
    print(f"isolated first token, p50: direct {1000 * iso['direct_ttft_p50_s']:.1f} ms, routed "
          f"{1000 * iso['routed_ttft_p50_s']:.1f} ms; burst TTFT cost {payload['ratios']['burst_ttft_p50_cost_ms']:.0f} ms")
    for target in payload["targets"]:
        print(f"{target['name']}: {target['value']} ({'≥' if target['unit'] == 'ratio' else '≤'} {target['limit']} "
              f"{target['unit']}) {'met' if target['met'] else 'NOT met'}")
    path = write_result("routing_quick" if args.quick else "routing", payload, started)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
