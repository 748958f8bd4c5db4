"""Request and response bodies of the HTTP API, as pydantic models (FastAPI validates and documents them).

Two dialects: the ChatGLM one of THUDM's `api.py` (`POST /`), and OpenAI's chat completions. Unknown keys are
ignored, as OpenAI clients send optional fields (`user`, `seed`, ...) that a local model has no use for;
wrong types and out-of-range values are errors.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from glmtune.serving.limits import RequestError

# Bounds that keep the per-token stop-string check cheap, as OpenAI's API sets them (it allows 4 stops).
MAX_STOPS = 16
MAX_STOP_CHARS = 256


def _encodable(text: str) -> str:
    """JSON may carry a lone surrogate (`"\\ud800"`) that no tokenizer can encode: refuse it as bad input."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"the text is not valid Unicode (a lone surrogate at character {err.start})"
        ) from None
    return text


# Every string that reaches the tokenizer is checked as it is parsed, so the error names its field.
Text = Annotated[str, AfterValidator(_encodable)]

# --- ChatGLM (THUDM api.py) -----------------------------------------------------------------------------------


class ChatGLMRequest(BaseModel):
    """`{prompt, history, max_length, top_p, temperature}`; `max_length` counts prompt + answer tokens."""

    model_config = ConfigDict(extra="ignore")

    prompt: Text
    history: list[tuple[Text, Text]] | None = None
    max_length: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    temperature: float | None = Field(default=None, ge=0, le=2)


class ChatGLMResponse(BaseModel):
    response: str
    history: list[tuple[str, str]]
    status: int
    time: str  # "YYYY-MM-DD HH:MM:SS", local time, as the published server writes it


# --- OpenAI chat completions --------------------------------------------------------------------------------


class TextPart(BaseModel):
    """A content part; only text is meaningful to a text model."""

    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    name: Text
    arguments: Text  # a JSON object, as a string (OpenAI's format)


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "developer" is OpenAI's newer name for the system role; "tool" carries a tool's result back.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, as the client got them from us
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content: required in a {self.role} message")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


def leading_system(messages: list[ChatMessage]) -> tuple[str | None, int]:
    """The system (and developer) messages a conversation starts with, joined into one system prompt, and the
    index of the first message after them; a 400 when nothing follows them."""
    start = 0
    while start < len(messages) and messages[start].role in ("system", "developer"):
        start += 1
    if start == len(messages):
        raise RequestError("messages: there is no user message (only system messages)", param="messages")
    return "\n".join(m.text for m in messages[:start]) or None, start


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Text = Field(min_length=1, max_length=64)
    description: Text | None = None
    parameters: dict | None = None  # a JSON schema, shown to the model as the published formats show it


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # any name is accepted: the server holds one model
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    tools: list[Tool] | None = None
    # "auto" (the default with tools): the model decides; "none": no tools are offered; a named function: it
    # is called (its name is put in the model's mouth); "required" is refused (see tool_calls.py).
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is None:
            return None
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings are allowed (got {len(stops)})")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string may be at most {MAX_STOP_CHARS} characters long")
        return stops


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "tool_calls"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is a tool call
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaToolCall(ToolCall):
    index: int  # which call of the message this chunk adds to


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glmtune"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape; the `openai` client raises it with `message` as the text."""

    error: ErrorBody
