"""A private `redis-server` for the fault tests, on its own port with no persistence, so a test can kill it
(every queued message is lost, as in a crash of an unpersisted broker) and start it again on the same port
without touching the Redis other developers share."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest


class RedisServer:
    def __init__(self, port: int, log_path: Path):
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> "RedisServer":
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{self.log_path.read_text()[-2000:]}") from None
                time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the broker vanishes mid-conversation and everything it held is gone."""
        if self.running:
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def llen(self, queue: str) -> int:
        import redis

        return int(redis.Redis(port=self.port).llen(queue))
