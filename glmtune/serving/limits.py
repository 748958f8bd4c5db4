"""How many tokens a request may generate, given the model's context; and the error a client gets back.

A prompt that does not fit must come back as a 400 that says by how much, never reach generate(): positions
past the model's context either crash inside the model or silently produce garbage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and an OpenAI-style error type."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.kind = kind
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def answer_budget(
    prompt_tokens: int,
    context: int | None,
    default_new_tokens: int,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
) -> int:
    """max_new_tokens for generate().

    `max_new_tokens` (OpenAI's max_tokens) and `max_length` (ChatGLM's prompt + answer) are the client's explicit
    asks: when they do not fit the context the request is refused. Without either, the server's default is
    shortened to what is left of the context.
    """
    if max_new_tokens is not None:
        if context is not None and prompt_tokens + max_new_tokens > context:
            raise RequestError(
                f"this model's maximum context length is {context} tokens, but {prompt_tokens + max_new_tokens} "
                f"were requested ({prompt_tokens} in the prompt, {max_new_tokens} for the answer): shorten the "
                "messages or lower max_tokens",
                param="messages",
            )
        return max_new_tokens
    if max_length is not None:
        if context is not None and max_length > context:
            raise RequestError(
                f"max_length {max_length} exceeds this model's context length of {context} tokens",
                param="max_length",
            )
        if prompt_tokens >= max_length:
            raise RequestError(
                f"the prompt and history are {prompt_tokens} tokens: max_length {max_length} (prompt + answer) "
                "leaves no room for an answer",
                param="max_length",
            )
        return max_length - prompt_tokens
    if context is not None and prompt_tokens >= context:
        raise RequestError(
            f"the prompt is {prompt_tokens} tokens, but this model's maximum context length is {context} tokens: "
            "shorten the prompt or the history",
            param="messages",
        )
    return default_new_tokens if context is None else min(default_new_tokens, context - prompt_tokens)


class AdmissionGate:
    """At most `capacity` generation requests held at once (running or waiting for the model); past that a
    request is refused at once with 429, so a burst cannot queue without bound and latency stays bounded.

    Only touched from the event loop's thread, so a plain counter needs no lock.
    """

    def __init__(self, capacity: int, retry_after_s: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"the queue must hold at least one request (got {capacity})")
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.held = 0

    def enter(self) -> None:
        if self.held >= self.capacity:
            raise RequestError(
                f"the server is busy ({self.held} requests queued or running, at most {self.capacity}): "
                f"retry after {self.retry_after_s} s",
                429,
                kind="rate_limit_error",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.held += 1

    def leave(self) -> None:
        self.held -= 1


@dataclass(frozen=True)
class ServingLimits:
    """How much one server takes on: requests held at once, answers generated together, body size, and how
    long a body may take."""

    max_queue: int = 64
    max_batch_size: int = 16
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 30.0
