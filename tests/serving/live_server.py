"""A live uvicorn server in a thread, on a free localhost port."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

API_KEY = "test-key-123"


@dataclass
class LiveServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not shut down"


def start_server(app, **uvicorn_settings) -> LiveServer:
    """uvicorn in a thread, on a socket bound before it starts (no port race); `uvicorn_settings` go to its
    Config (infer_api.py's limits, say)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, **{"log_level": "warning", "timeout_graceful_shutdown": 5, **uvicorn_settings})
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    return LiveServer(f"http://127.0.0.1:{port}", server, thread)
