"""What stands between the network and the API: the key, the Host header, body size and read time limits.

ASGI middlewares rather than FastAPI dependencies, so each check runs before the body is read or parsed; and
a uvicorn protocol that closes connections whose request headers do not arrive in time.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glmtune.serving.limits import RequestError

# The one path open without a key: probes that must not hold a secret.
OPEN_PATHS = ("/health",)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


class BearerAuth:
    """Every HTTP request outside `open_prefixes` needs `Authorization: Bearer <key>`: a client without the
    key learns nothing, not even what a valid body looks like (docs and schema included)."""

    def __init__(self, app: ASGIApp, api_key: str, open_prefixes: Sequence[str] = OPEN_PATHS) -> None:
        if not api_key:
            raise ValueError("an empty API key would let anyone in")
        self.app = app
        self.key = api_key.encode()
        self.open_prefixes = tuple(open_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _under(scope["path"], self.open_prefixes):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        error = RequestError(
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            401,
            kind="authentication_error",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error.response()(scope, receive, send)


def host_name(header: str) -> str:
    """The name in a Host header without its port: `[::1]:8000` -> `::1`, `localhost:80` -> `localhost`."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostAllowList:
    """Only requests whose Host header names this server: a web page on another site that rebinds its DNS
    name to 127.0.0.1 sends its own name as the Host, so it cannot drive a keyless local server."""

    def __init__(self, app: ASGIApp, hosts: Sequence[str]) -> None:
        self.app = app
        self.hosts = {h.lower() for h in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(header).lower() not in self.hosts:
                error = RequestError(
                    f"Host {header!r} is not this server's name (allowed: {', '.join(sorted(self.hosts))})",
                    421,
                    param="Host",
                )
                if scope["type"] == "http":
                    await error.response()(scope, receive, send)
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


class BodyLimits:
    """A request body larger than `max_bytes` gets 413 before anything parses it; one that does not arrive
    within `timeout_s` (a client trickling it byte by byte to hold a connection) gets 408."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self) -> RequestError:
        return RequestError(f"the request body is larger than {self.max_bytes} bytes", 413)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        with anyio.move_on_after(self.timeout_s) as deadline:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_bytes:
                    await self._too_large().response()(scope, receive, send)
                    return
                if not message.get("more_body", False):
                    break
        if deadline.cancelled_caught:
            error = RequestError(f"the request body did not arrive within {self.timeout_s:g} s", 408)
            await error.response()(scope, receive, send)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            # The app reads the body once; after that, `receive` only reports a client that went away.
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's HTTP/1.1 protocol, closing a connection whose next request's headers have not all arrived
    within `timeout_s` of the connection opening (or of the previous response): uvicorn's own keep-alive
    timeout stops counting at the first byte, so headers sent a byte at a time would hold it forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            waiting_after = self.cycle  # a new request replaces the cycle once its headers are complete

            def expire() -> None:
                if self.cycle is waiting_after and not self.transport.is_closing():
                    self.transport.close()

            self.loop.call_later(timeout_s, expire)

    return HeaderTimeoutH11
