"""The HTTP API: ChatGLM's `POST /` and OpenAI's `/v1/chat/completions` and `/v1/models`, on one ChatEngine.

Generation runs in worker threads (the event loop keeps answering other requests meanwhile) and the engine's
lock lets one generate() run at a time. Answers requested while the model is busy, streamed or not, are
generated together in one batch (see batching.py), each the answer it would get alone. Streams are
OpenAI server-sent events: `data: {chunk}` lines, then `data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from glmtune.inference.engine import ChatEngine, Completion, held_back
from glmtune.inference.reward import RewardScorer
from glmtune.serving.batching import Batcher
from glmtune.serving.guards import OPEN_PATHS, BearerAuth, BodyLimits, HostAllowList
from glmtune.serving.limits import AdmissionGate, RequestError, ServingLimits, answer_budget
from glmtune.serving.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatGLMRequest,
    ChatGLMResponse,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    DeltaToolCall,
    ErrorResponse,
    FinishReason,
    ModelCard,
    ModelList,
    Usage,
    leading_system,
)
from glmtune.serving.score import add_score_route
from glmtune.serving.tool_calls import ToolConversation, tool_conversation, uses_tools
from glmtune.serving.tool_calls import answer as tool_answer
from glmtune.serving.web import mount_chat_ui

log = logging.getLogger("glmtune.serving")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse},
    413: {"model": ErrorResponse},
    429: {"model": ErrorResponse},
}
# Below this a temperature divides the logits into inf/nan; vLLM treats it as greedy, and so do we.
GREEDY_BELOW = 1e-5


def _validation_message(errors: Sequence[Any], content_type: str) -> str:
    """pydantic's error list as one line per problem, each naming the field (`messages.1.role: ...`)."""
    if "json" not in content_type and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return f"the body must be a JSON object sent with 'Content-Type: application/json' (got {content_type!r})"
    lines = []
    for err in errors:
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx", {}).get("error", "")
            lines.append(f"malformed JSON body at character {loc[-1] if loc else '?'}: {ctx}".rstrip(": "))
            continue
        field = ".".join(loc) or "body"
        # pydantic prefixes our validators' messages with "Value error, ": the message alone says it
        lines.append(f"{field}: {err.get('msg', 'invalid').removeprefix('Value error, ')}")
    return "; ".join(lines) or "invalid request body"


def conversation(messages: Sequence[ChatMessage]) -> tuple[str, list[tuple[str, str]], str | None]:
    """OpenAI messages as (query, history pairs, system): system messages first, then user and assistant
    messages alternating, starting and ending with the user."""
    system, start = leading_system(messages)
    turns = messages[start:]
    for offset, message in enumerate(turns):
        expected = "user" if offset % 2 == 0 else "assistant"
        if message.role != expected:
            raise RequestError(
                f"messages.{start + offset}: expected a {expected!r} message, got {message.role!r} (system "
                "messages come first, then user and assistant messages alternate, starting with the user)",
                param="messages",
            )
    if turns[-1].role != "user":
        raise RequestError(
            f"messages: the last message must come from the user, not the {turns[-1].role}", param="messages"
        )
    history = [(turns[i].text, turns[i + 1].text) for i in range(0, len(turns) - 1, 2)]
    return turns[-1].text, history, system


def sampling(temperature: float | None, top_p: float | None) -> dict[str, Any]:
    """Client sampling settings as ChatEngine overrides: a temperature of (nearly) 0 means greedy, above
    that sampling.

    Unset values keep the server's generation config (greedy in the default config).
    """
    overrides: dict[str, Any] = {}
    if temperature is not None:
        overrides["do_sample"] = temperature >= GREEDY_BELOW
        if temperature >= GREEDY_BELOW:
            overrides["temperature"] = temperature
    if top_p is not None:
        overrides["top_p"] = top_p
    return overrides


class DeltaTracker:
    """Turns the growing streamed answer into deltas that never have to be taken back.

    The final answer is stripped and cut at the first stop string, so while streaming we hold back trailing
    whitespace and any tail that could be the start of a stop string; `finish` sends the rest.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.sent = ""

    def update(self, shown: str) -> str:
        text = shown.lstrip()
        ready = text[: len(text) - held_back(text, self.stops)].rstrip()
        if not ready.startswith(self.sent) or len(ready) <= len(self.sent):
            return ""
        delta, self.sent = ready[len(self.sent) :], ready
        return delta

    def finish(self, final: str) -> str:
        if not final.startswith(self.sent):
            # Cannot happen by construction; log it rather than send text that contradicts what was sent.
            log.warning("streamed text %r is not a prefix of the final answer %r", self.sent, final)
            return ""
        delta, self.sent = final[len(self.sent) :], final
        return delta


def create_app(
    engine: ChatEngine | None,
    *,
    scorer: RewardScorer | None = None,
    model_name: str = "glmtune",
    api_key: str | None = None,
    ui_path: str | None = None,
    limits: ServingLimits | None = None,
    allowed_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` (chat), or `scorer` (a reward model: POST /v1/score only); with
    `api_key`, every route but /health needs it.

    `ui_path` (e.g. "/chat") also mounts the Gradio web chat there; with `api_key` its login asks for the key
    as the password (a browser cannot send a Bearer header). `allowed_hosts`: the only Host headers served
    (a keyless server on loopback names itself, so a DNS-rebinding page cannot reach it).
    """
    if api_key is not None and not api_key:
        raise ValueError("the API key is empty: that would let anyone in")
    app = FastAPI(title="glmtune API", description="ChatGLM-style and OpenAI-compatible chat on one model.")
    app.state.engine = engine
    app.state.model_name = model_name
    limits = limits or ServingLimits()
    gate = app.state.gate = AdmissionGate(limits.max_queue)
    add_error_handlers(app)
    add_info_routes(app, model_name)
    if (engine is None) == (scorer is None):
        raise ValueError("serve a chat engine or a reward scorer: exactly one of the two")
    if engine is not None:
        batcher = app.state.batcher = Batcher(engine, limits.max_batch_size)
        add_chatglm_route(app, engine, gate, batcher)
        add_openai_chat_route(app, engine, model_name, gate, batcher)
    else:
        if ui_path:
            raise ValueError("a reward model has no chat page: it scores answers and writes none")
        add_score_route(app, scorer, model_name, gate, ERROR_RESPONSES)
    open_paths = OPEN_PATHS
    if ui_path:
        mount_chat_ui(app, engine, ui_path, title=f"glmtune chat: {model_name}", password=api_key)
        open_paths = (*OPEN_PATHS, ui_path)  # behind Gradio's own login, which asks for the key
    # Added last runs first: the Host, then the key, then the body.
    app.add_middleware(BodyLimits, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key, open_prefixes=open_paths)
    if allowed_hosts:
        app.add_middleware(HostAllowList, hosts=allowed_hosts)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error, ours, pydantic's or Starlette's, as an OpenAI-style error body naming what was wrong; a
    bug as a 500 in the same shape that says nothing of the internals (they go to the server log)."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            RequestError(_validation_message(err.errors(), request.headers.get("content-type", ""))).body(),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            RequestError(str(err.detail), err.status_code, kind=kind).body(),
            status_code=err.status_code,
            headers=getattr(err, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return RequestError("internal server error (see the server log)", 500, kind="server_error").response()


def add_info_routes(app: FastAPI, model_name: str) -> None:
    """GET /health (open, for probes) and GET /v1/models."""
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created)])


async def chat_prompt(
    engine: ChatEngine, query: str, history: list[tuple[str, str]], system: str | None
) -> list[int]:
    try:
        return await run_in_threadpool(engine.prompt_ids, query, history, system)
    except ValueError as err:  # the template refuses the conversation (e.g. a role it cannot place)
        raise RequestError(f"messages: {err}", param="messages") from err


def add_chatglm_route(app: FastAPI, engine: ChatEngine, gate: AdmissionGate, batcher: Batcher) -> None:
    """POST /, as THUDM ChatGLM's api.py: one answer with the updated history."""
    default_new_tokens = engine.generation.max_new_tokens

    @app.post("/", response_model=ChatGLMResponse, responses=ERROR_RESPONSES)
    async def chatglm(body: ChatGLMRequest) -> ChatGLMResponse:
        """THUDM ChatGLM api.py: one answer with the updated history."""
        history = list(body.history or [])
        gate.enter()
        try:
            prompt = await chat_prompt(engine, body.prompt, history, None)
            budget = answer_budget(
                len(prompt), engine.context_length, default_new_tokens, max_length=body.max_length
            )
            overrides = {**sampling(body.temperature, body.top_p), "max_new_tokens": budget}
            completion = await batcher.complete(prompt, overrides)
        finally:
            gate.leave()
        log.info(
            "POST / prompt=%d tokens answer=%d tokens", completion.prompt_tokens, completion.completion_tokens
        )
        return ChatGLMResponse(
            response=completion.text,
            history=[*history, (body.prompt, completion.text)],
            status=200,
            time=datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        )


def add_openai_chat_route(
    app: FastAPI, engine: ChatEngine, model_name: str, gate: AdmissionGate, batcher: Batcher
) -> None:
    """POST /v1/chat/completions, OpenAI's chat API: one answer, or server-sent events with `stream`; tool
    calls on models whose chat format has them (see tool_calls.py)."""
    default_new_tokens = engine.generation.max_new_tokens

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest):
        tools: ToolConversation | None = None
        if uses_tools(body):
            tools = await run_in_threadpool(tool_conversation, engine, body)
            prompt = tools.prompt
        else:
            prompt = await chat_prompt(engine, *conversation(body.messages))
        gate.enter()
        streaming = False
        try:
            response = await _answer(body, prompt, tools)
            streaming = isinstance(response, GatedStream)
            return response
        finally:
            if not streaming:  # a stream leaves the gate when it ends
                gate.leave()

    async def _answer(body: ChatCompletionRequest, prompt: list[int], tools: ToolConversation | None):
        budget = answer_budget(
            len(prompt),
            engine.context_length,
            default_new_tokens,
            max_new_tokens=body.max_tokens or body.max_completion_tokens,
        )
        overrides = {**sampling(body.temperature, body.top_p), "max_new_tokens": budget, "stop": body.stop}
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = SSEStream(engine, model_name, completion_id, include_usage)
        if body.stream and tools is None:
            if engine.generation.num_beams > 1:
                raise RequestError(
                    "stream: this server uses beam search (generation.num_beams > 1), which picks its answer "
                    "at the end; ask without stream",
                    param="stream",
                )
            return stream.response(gate, stream.events(batcher, prompt, overrides))
        completion = await batcher.complete(prompt, overrides)
        if tools is None:
            message, finish_reason = AssistantMessage(content=completion.text), completion.finish_reason
        else:
            message, finish_reason = tool_answer(engine, tools, completion)
        if body.stream:
            # A tool call is known only once the answer is whole: it is sent in one piece.
            return stream.response(gate, stream.whole(message, finish_reason, completion))
        return ChatCompletion(
            id=completion_id,
            created=int(time.time()),
            model=model_name,
            choices=[Choice(index=0, message=message, finish_reason=finish_reason)],
            usage=usage(completion),
        )


class GatedStream(StreamingResponse):
    """A streamed answer that holds its place in the admission gate until the stream has ended, however it
    ends (finished, failed, or the client gone)."""

    def __init__(self, gate: AdmissionGate, content: AsyncIterator[str], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gate.leave()


def usage(completion: Completion) -> Usage:
    return Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        total_tokens=completion.prompt_tokens + completion.completion_tokens,
    )


class SSEStream:
    """One streamed chat completion as OpenAI server-sent events: a role chunk, content deltas, the finish
    reason, optionally the usage, then `data: [DONE]`."""

    def __init__(self, engine: ChatEngine, model_name: str, completion_id: str, include_usage: bool) -> None:
        self.engine = engine
        self.model_name = model_name
        self.completion_id = completion_id
        self.include_usage = include_usage
        self.created = int(time.time())  # one timestamp for every chunk of the completion, as OpenAI sends

    def chunk(self, choices: list[ChunkChoice], usage_: Usage | None = None) -> str:
        body = ChatCompletionChunk(
            id=self.completion_id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model_name,
            choices=choices,
        )
        if usage_ is not None:
            body.usage = usage_
        return f"data: {body.model_dump_json(exclude_unset=True)}\n\n"

    def content(self, text: str) -> str:
        return self.chunk([ChunkChoice(index=0, delta=Delta(content=text), finish_reason=None)])

    def opening(self) -> str:
        return self.chunk(
            [ChunkChoice(index=0, delta=Delta(role="assistant", content=""), finish_reason=None)]
        )

    def ending(self, finish_reason: FinishReason, completion: Completion) -> Iterator[str]:
        yield self.chunk([ChunkChoice(index=0, delta=Delta(), finish_reason=finish_reason)])
        if self.include_usage:
            yield self.chunk([], usage(completion))
        yield "data: [DONE]\n\n"

    def response(self, gate: AdmissionGate, events: AsyncIterator[str]) -> GatedStream:
        return GatedStream(
            gate,
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def whole(
        self, message: AssistantMessage, finish_reason: FinishReason, completion: Completion
    ) -> AsyncIterator[str]:
        """A finished answer as a stream: its text, or its tool calls, in one chunk."""
        yield self.opening()
        if message.tool_calls:
            calls = [DeltaToolCall(index=i, **c.model_dump()) for i, c in enumerate(message.tool_calls)]
            yield self.chunk([ChunkChoice(index=0, delta=Delta(tool_calls=calls), finish_reason=None)])
        elif message.content:
            yield self.content(message.content)
        for event in self.ending(finish_reason, completion):
            yield event

    async def events(self, batcher: Batcher, prompt: list[int], overrides: dict) -> AsyncIterator[str]:
        """The answer streamed from its row of a batch (see batching.py)."""
        tracker = DeltaTracker(overrides.get("stop") or self.engine.generation.stop)
        answer = batcher.stream(prompt, overrides)
        try:
            yield self.opening()
            async for value in answer:
                if isinstance(value, Completion):
                    rest = tracker.finish(value.text)
                    if rest:
                        yield self.content(rest)
                    for event in self.ending(value.finish_reason, value):
                        yield event
                    break
                delta = tracker.update(value)
                if delta:
                    yield self.content(delta)
        except Exception:
            # The 200 status and earlier chunks are already sent: report in the stream, as OpenAI does, and
            # end it as every stream ends; what went wrong inside is for the server log, not the client.
            log.exception("generation failed while streaming %s", self.completion_id)
            error = RequestError("generation failed (see the server log)", 500, kind="server_error")
            yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            # Closing it stops the row at its next token (the client gone, or the answer done anyway).
            with anyio.CancelScope(shield=True):
                await answer.aclose()
