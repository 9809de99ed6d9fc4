"""A serving replica inside the calling process: its own uvicorn server on a free loopback port, on a thread,
registered in the registry like any other. `svfit serve` runs one so a laptop stays one command (the API
reaches it over loopback HTTP, the path production takes); tests and benchmarks start them the same way.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from api.core.settings import Settings
from serving.app import create_serving_app

START_TIMEOUT_S = 60.0


class ReplicaThread:
    def __init__(self, settings: Settings, host: str = "127.0.0.1", *, register: bool = True) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        self.url = f"http://{host}:{self._socket.getsockname()[1]}"
        self.app = create_serving_app(settings, advertise_url=self.url if register else None)
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, name="serving-replica", daemon=True
        )

    def start(self) -> "ReplicaThread":
        """Returns once the replica answers and (unless told not to register) its first heartbeat is in."""
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process serving replica did not start (see the log above)")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def __enter__(self) -> "ReplicaThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
