"""Serving that holds, against a real uvicorn server on 127.0.0.1 with infer_api.py's limits: the official
`openai` client, a full queue, slow clients, DNS rebinding, and a fuzz of invalid bodies.

Every request goes to the loopback server this module starts; each loop is bounded in count and time.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")

from glmtune.serving.api import create_app  # noqa: E402
from glmtune.serving.launch import allowed_hosts, uvicorn_limits  # noqa: E402
from glmtune.serving.limits import ServingLimits  # noqa: E402
from tests.serving.live_server import API_KEY, LiveServer, start_server  # noqa: E402

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT_S = 1.0  # header and body timeouts of the server under test
HI = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def server(engine) -> Iterator[LiveServer]:
    limits = ServingLimits(max_queue=2, max_body_bytes=1024 * 1024, body_timeout_s=TIMEOUT_S)
    app = create_app(engine, model_name="live", api_key=API_KEY, limits=limits)
    live = start_server(app, **uvicorn_limits(TIMEOUT_S))
    yield live
    live.stop()


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def address(server: LiveServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def test_openai_client_gets_greedy_answers_and_clear_400s(server, engine):
    api = client(server)
    got = api.chat.completions.create(model="m", messages=HI, max_tokens=8, temperature=1e-45)
    assert got.choices[0].message.content == engine.complete("你好", max_new_tokens=8).text
    # The openai client cannot even encode a lone surrogate; a raw JSON escape carries it.
    raw = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    headers = {**AUTH, "Content-Type": "application/json"}
    lone = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers=headers, timeout=30)
    assert lone.status_code == 400 and "surrogate" in lone.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="stop"):
        api.chat.completions.create(model="m", messages=HI, stop=[str(i) for i in range(50_000)])
    with pytest.raises(openai.APIStatusError) as too_big:
        api.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 2_000_000}])
    assert too_big.value.status_code == 413


def test_a_full_queue_answers_429_with_retry_after(server, engine):
    gate = server.server.config.app.state.gate
    body = {"messages": HI, "max_tokens": 4}
    with ThreadPoolExecutor(2) as pool:
        with engine._lock:  # the model is busy: the next requests wait, holding their places
            waiting = [
                pool.submit(
                    httpx.post, f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60
                )
                for _ in range(2)
            ]
            deadline = time.monotonic() + 30
            while gate.held < 2:
                assert time.monotonic() < deadline, "the two requests never reached the queue"
                time.sleep(0.05)
            refused = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=10)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                client(server).chat.completions.create(model="m", messages=HI, max_tokens=4)
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert [f.result().status_code for f in waiting] == [200, 200]
    assert gate.held == 0
    assert client(server).chat.completions.create(model="m", messages=HI, max_tokens=4).choices


def closed_within(sock: socket.socket, limit_s: float, trickle: bytes = b"") -> tuple[bool, bytes]:
    """Send `trickle` a byte every 0.2 s (then nothing) until the server closes the socket or `limit_s`
    passes: (closed, what the server sent)."""
    sock.settimeout(0.2)
    received = b""
    deadline = time.monotonic() + limit_s
    sent = 0
    while time.monotonic() < deadline:
        try:
            if sent < len(trickle):
                sock.sendall(trickle[sent : sent + 1])
                sent += 1
            data = sock.recv(4096)
            if not data:
                return True, received
            received += data
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True, received
    return False, received


def test_slow_headers_and_idle_connections_are_closed(server):
    for trickle in (b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200):
        with socket.create_connection(address(server), timeout=5) as sock:
            closed, _ = closed_within(sock, 6 * TIMEOUT_S, trickle)
            assert closed, f"a client sending {len(trickle)} header bytes slowly was never disconnected"


def test_a_trickled_body_gets_408(server):
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: 200\r\n\r\n"
    ).encode()
    with socket.create_connection(address(server), timeout=5) as sock:
        sock.sendall(head)
        closed, received = closed_within(sock, 6 * TIMEOUT_S, b"{" + b" " * 199)
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_a_keyless_loopback_server_refuses_a_rebound_host(engine):
    live = start_server(create_app(engine, allowed_hosts=allowed_hosts("127.0.0.1", None)))
    try:
        evil = httpx.get(f"{live.url}/v1/models", headers={"Host": "evil.example"}, timeout=10)
        assert evil.status_code == 421
        assert httpx.get(f"{live.url}/v1/models", timeout=10).status_code == 200
    finally:
        live.stop()


def invalid_bodies(count: int, seed: int = 16) -> Iterator[tuple[str, bytes]]:
    """(path, raw body) pairs: a valid request with one or two fields broken at random."""
    rng = random.Random(seed)
    junk = [
        None, -1, 0, 2**70, -(2**70), 1e308, -1e-300, "", "\ud800", "x" * 300, [], {}, [[]], [None], True,
        {"role": "tool"}, [{"role": "user"}], [{"role": "user", "content": 5}], "NaN", [{"type": "image"}],
    ]  # fmt: skip
    chat_fields = ["messages", "temperature", "top_p", "max_tokens", "stop", "stream", "n", "stream_options"]
    glm_fields = ["prompt", "history", "max_length", "temperature", "top_p"]
    for _ in range(count):
        kind = rng.random()
        if kind < 0.1:  # not JSON at all, or cut off
            valid = json.dumps({"messages": HI, "max_tokens": 2}).encode()
            yield "/v1/chat/completions", valid[: rng.randrange(len(valid))] + bytes([rng.randrange(256)])
            continue
        if kind < 0.55:
            path, body, fields = "/v1/chat/completions", {"messages": HI, "max_tokens": 2}, chat_fields
        else:
            path, body, fields = "/", {"prompt": "你好", "max_length": 40}, glm_fields
        for field in rng.sample(fields, rng.choice((1, 2))):
            body[field] = rng.choice(junk)
        yield path, json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


def test_fuzzed_bodies_never_get_a_5xx(server):
    statuses: dict[int, int] = {}
    bodies = list(invalid_bodies(240))
    assert len(bodies) >= 200
    with httpx.Client(base_url=server.url, headers={**AUTH, "Content-Type": "application/json"}) as http:
        for path, raw in bodies:
            response = http.post(path, content=raw, timeout=60)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (raw, response.text)
            if response.status_code >= 400:
                assert set(response.json()) == {"error"}, response.text
    assert statuses.get(400, 0) >= 100, statuses  # mostly refused, as they should be
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_a_stream_with_many_long_stops_leaves_health_answering(server):
    stops = [chr(0x4E00 + i) * 256 for i in range(16)]
    body = {"messages": HI, "max_tokens": 64, "stop": stops, "stream": True}
    done = threading.Event()
    events: list[str] = []

    def stream() -> None:
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60
        ) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data: "))
        done.set()

    worker = threading.Thread(target=stream)
    worker.start()
    while not done.is_set():
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        time.sleep(0.05)
    worker.join(timeout=60)
    assert events[-1] == "data: [DONE]"
