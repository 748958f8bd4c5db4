"""OpenAI tool calling on ChatGLM3 and GLM-4: the request's tools and messages as the published chat messages,
and the model's answer back as `tool_calls`.

The conversation is rendered as the published API demos render it: the tools on a system message first
(ChatGLM3: its tool prompt and the functions; GLM-4: the typed tools of its chat_template), an assistant's
earlier call as an assistant message with the tool's name as metadata, a `tool` result as an `observation`
message. The model answers a call with the tool's name on the first line and the arguments after it (and
stops at `<|observation|>`); the answer is a tool call when that name is one the request offered and the
arguments parse (never evaluated: see glmtune/data/tool_calls.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from glmtune.inference.engine import ChatEngine, Completion
from glmtune.serving.limits import RequestError
from glmtune.serving.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatMessage,
    FinishReason,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
    leading_system,
)
from glmtune.tokenizers.tool_prompts import (
    call_opening_ids,
    parse_tool_call,
    tool_call_message,
    tools_system_message,
)


def uses_tools(body: ChatCompletionRequest) -> bool:
    """Whether the request is a tool-calling conversation (tools offered, or calls and results in it)."""
    return bool(body.tools) or any(m.role == "tool" or m.tool_calls for m in body.messages)


@dataclass
class ToolConversation:
    """A tool-calling request, ready for the engine."""

    prompt: list[int]
    tool_names: list[str]  # the tools offered: only a call to one of these is a tool call
    forced: str | None  # the function tool_choice names, already written into the prompt


def _offered_tools(body: ChatCompletionRequest) -> tuple[list[dict[str, Any]], str | None]:
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice = body.tool_choice
    if choice == "none":
        return [], None
    if choice == "required":
        raise RequestError(
            "tool_choice 'required' is not supported: use 'auto' or name the function to call",
            param="tool_choice",
        )
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not named:
            raise RequestError(
                f"tool_choice names the function {choice.function.name!r}, which is not in tools",
                param="tool_choice",
            )
        return named, choice.function.name
    return tools, None


def _arguments(text: str, where: str) -> dict[str, Any]:
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(f"{where}: not valid JSON ({err.msg})", param="messages") from None
    if not isinstance(arguments, dict):
        raise RequestError(f"{where}: the arguments must be a JSON object", param="messages")
    return arguments


def published_messages(
    tokenizer: Any, messages: Sequence[ChatMessage], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """OpenAI messages as the published chat messages (roles system, user, assistant, observation)."""
    system, start = leading_system(messages)
    if tools:
        out = [tools_system_message(tokenizer, tools, system)]
    else:
        out = [{"role": "system", "content": system}] if system else []
    for i, message in enumerate(messages[start:], start):
        if message.role in ("system", "developer"):
            out.append({"role": "system", "content": message.text})
        elif message.role == "tool":
            out.append({"role": "observation", "content": message.text})
        elif message.role == "assistant":
            if message.text:
                out.append({"role": "assistant", "content": message.text})
            for j, call in enumerate(message.tool_calls or []):
                where = f"messages.{i}.tool_calls.{j}.function.arguments"
                arguments = _arguments(call.function.arguments, where)
                out.append(tool_call_message(tokenizer, call.function.name, arguments))
        else:
            out.append({"role": "user", "content": message.text})
    if messages[-1].role not in ("user", "tool"):
        raise RequestError(
            f"messages: the last message must come from the user or a tool, not the {messages[-1].role}",
            param="messages",
        )
    return out


def tool_conversation(engine: ChatEngine, body: ChatCompletionRequest) -> ToolConversation:
    """The prompt of a tool-calling request; a 400 when the model's chat format has no tools."""
    template = engine.template
    if not template.supports_tools:
        raise RequestError(
            f"this model's chat template ({template.name}) has no tool-call format: tools work with ChatGLM3 "
            "and GLM-4 models (templates chatglm3, glm4)",
            param="tools",
        )
    tools, forced = _offered_tools(body)
    messages = published_messages(engine.tokenizer, body.messages, tools)
    try:
        prompt = engine.messages_prompt_ids(messages)
    except ValueError as err:  # the template refuses the conversation
        raise RequestError(f"messages: {err}", param="messages") from err
    if forced is not None:
        # The name line that opens a call, as the model writes it: the answer is then its arguments.
        prompt += call_opening_ids(engine.tokenizer, forced)
    return ToolConversation(prompt, [t["function"]["name"] for t in tools], forced)


def answer(
    engine: ChatEngine, conversation: ToolConversation, completion: Completion
) -> tuple[AssistantMessage, FinishReason]:
    """The assistant message of a tool-calling request: a call to an offered tool, or text."""
    text = completion.text
    if conversation.forced is not None:
        text = f"{conversation.forced}\n{text}"
    call = parse_tool_call(engine.tokenizer, text, conversation.tool_names)
    if call is None or completion.finish_reason == "length":
        return AssistantMessage(content=completion.text), completion.finish_reason
    name, arguments = call
    tool_call = ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)),
    )
    return AssistantMessage(content=None, tool_calls=[tool_call]), "tool_calls"
