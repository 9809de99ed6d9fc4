"""Supervised worker processes: the worker child of `svfit serve` and the N children of `svfit worker
--concurrency N` / `--gpus`. Each is started again whenever it dies (with the same environment, so a child
pinned to a GPU stays on it), and stopped (its running job checkpointed and handed back) when its parent
exits.

A process manager restarts a worker container whose main process exits, but not one child of N: without
this, a dead child would silently cost a slot, and in the embedded default an API whose only worker is gone
accepts jobs that stay `queued` for ever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

# How long a worker asked to stop may take to checkpoint its running job and exit before it is killed.
STOP_TIMEOUT_S = 60.0
# A worker that dies sooner than this after starting is failing at start-up: wait longer before the next try.
HEALTHY_AFTER_S = 30.0
FIRST_RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0


def _die_with_parent() -> None:
    """Runs in the worker child before exec: if `serve` dies without stopping it (SIGKILL, a crash), the
    kernel sends the worker SIGTERM, so no orphan keeps consuming jobs. Linux only; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_process(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM (the running job checkpoints and goes back to the queue), then SIGKILL if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class SupervisedWorker:
    """One worker process, restarted with a growing delay each time it exits on its own."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        label: str = "worker",
        env: Mapping[str, str] | None = None,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ):
        self.command = list(command)
        self.label = label  # how the log lines name this process ("worker", "worker 2/4 on GPU 1")
        self.env = dict(env or {})  # set over this process's environment at every start (CUDA_VISIBLE_DEVICES)
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        # Held while spawning or stopping, so `stop` never misses a process that is being started.
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> "SupervisedWorker":
        self._spawn()
        self._watcher.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            if self.process is not None:
                stop_process(self.process, self.stop_timeout_s)
        self._watcher.join(timeout=5)

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            # Its own session: a Ctrl+C in the terminal reaches only `serve`, which stops the worker itself.
            env = {**os.environ, **self.env} if self.env else None
            self.process = subprocess.Popen(
                self.command, start_new_session=True, preexec_fn=_die_with_parent, env=env
            )
        print(f"  {self.label + ':':<10} pid {self.process.pid}", flush=True)

    def _watch(self) -> None:
        delay = FIRST_RESTART_DELAY_S
        while True:
            started = time.monotonic()
            code = self.process.wait()
            if self._stopping.is_set():
                return
            delay = FIRST_RESTART_DELAY_S if time.monotonic() - started > HEALTHY_AFTER_S else delay
            print(f"svfit: {self.label} exited with code {code}; starting another in {delay:.0f} s", flush=True)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, MAX_RESTART_DELAY_S)
            self._spawn()


def stop_all(workers: Sequence[SupervisedWorker]) -> None:
    """Stop every worker at once: each may take up to its stop timeout to checkpoint its job."""
    stoppers = [threading.Thread(target=w.stop, name=f"stop-{w.label}") for w in workers]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()
