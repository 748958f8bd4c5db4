"""The web chat: a Gradio ChatInterface streaming from the same ChatEngine as the HTTP API.

Gradio is imported here only, so the API server starts without it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from glmtune.config import ConfigError
from glmtune.inference.engine import ChatEngine
from glmtune.serving.limits import RequestError, answer_budget

# Gradio phones home (usage analytics, version check) unless told not to; a local server has no business there.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _text(content: Any) -> str:
    """The text of a Gradio message: a string, a `{"type": "text", "text": ...}` part, or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text", "")) if content.get("type", "text") == "text" else ""
    if isinstance(content, Sequence):
        return "".join(_text(part) for part in content)
    return ""  # files and components have no text for the model


def history_pairs(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(query, answer) pairs from Gradio's openai-style history; a user message left without an answer (its
    generation failed) is dropped."""
    pairs: list[tuple[str, str]] = []
    pending: str | None = None
    for message in messages:
        if message.get("role") == "user":
            pending = _text(message.get("content"))
        elif message.get("role") == "assistant" and pending is not None:
            pairs.append((pending, _text(message.get("content"))))
            pending = None
    return pairs


def gradio_module():
    """gradio, or a ConfigError saying how to install it (the web chat is an optional extra)."""
    try:
        import gradio
    except ImportError as err:
        raise ConfigError(f"the web chat (--ui) needs gradio: pip install -e '.[serve]' ({err})") from None
    return gradio


def build_chat_ui(engine: ChatEngine, title: str = "glmtune chat"):
    """A `gr.ChatInterface` whose answers stream token by token."""
    gr = gradio_module()

    def respond(message: str, history: list[dict]) -> Iterator[str]:
        pairs = history_pairs(history)
        try:
            prompt_tokens = len(engine.prompt_ids(message, pairs))
            budget = answer_budget(prompt_tokens, engine.context_length, engine.generation.max_new_tokens)
        except RequestError as err:
            raise gr.Error(err.message) from err
        yield from engine.stream_chat(message, pairs, max_new_tokens=budget)

    return gr.ChatInterface(
        respond,
        title=title,
        description="Answers stream as the model writes them; the conversation so far is the model's history.",
        chatbot=gr.Chatbot(label="chat", elem_id="chatbot"),
        textbox=gr.Textbox(placeholder="Type a message and press Enter", elem_id="message", lines=1),
        flagging_mode="never",
    )


def mount_chat_ui(
    app, engine: ChatEngine, path: str, *, title: str = "glmtune chat", password: str | None = None
):
    """Serve the web chat under `path` of a FastAPI app; with `password`, behind Gradio's login (any user name)."""
    gr = gradio_module()

    def login(username: str, given: str) -> bool:
        return secrets.compare_digest(given.encode(), (password or "").encode())

    return gr.mount_gradio_app(
        app, build_chat_ui(engine, title), path=path, auth=login if password else None, footer_links=[]
    )
