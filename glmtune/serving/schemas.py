"""Request and response bodies of the HTTP API, as pydantic models (FastAPI validates and documents them).

Two dialects: the ChatGLM one of THUDM's `api.py` (`POST /`), and OpenAI's chat completions. Unknown keys are
ignored, as OpenAI clients send optional fields (`user`, `seed`, ...) that a local model has no use for;
wrong types and out-of-range values are errors.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# --- ChatGLM (THUDM api.py) -----------------------------------------------------------------------------------


class ChatGLMRequest(BaseModel):
    """`{prompt, history, max_length, top_p, temperature}`; `max_length` counts prompt + answer tokens."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    history: list[tuple[str, str]] | None = None
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
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


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
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

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
        if stops is not None and any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


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
