"""A live uvicorn server in a thread, on a free localhost port; or infer_api.py as a process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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


REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ScriptServer:
    url: str
    output: list[str] = field(default_factory=list)  # the process's output, once it has stopped
    returncode: list[int] = field(default_factory=list)


@contextmanager
def script_server(
    *args: str, env: dict[str, str] | None = None, start_s: float = 180
) -> Iterator[ScriptServer]:
    """`python infer_api.py ARGS --port P` until /health answers; stopped with Ctrl-C (SIGINT) after."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "infer_api.py", *args, "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    live = ScriptServer(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + start_s
        while True:
            assert proc.poll() is None, f"infer_api.py exited early:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "infer_api.py did not start in time"
            try:
                if httpx.get(f"{live.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield live
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        live.output.append(output)
        live.returncode.append(proc.returncode)
