"""Training samples of tool-call dialogues (ChatGLM3 / GLM-4 messages with tools, tool calls and observations).

A dialogue is a list of published chat messages (`{"role", "content", "metadata"?, "tools"?}`, roles system,
user, assistant, observation), rendered as the published chat formats do:

- ChatGLM3: `[gMASK] sop`, then for each message `<|role|>` + ids of `metadata + "\\n"` + ids of the content
  (a system message's `tools` appended to its content as indented JSON, as the published `build_chat_input`
  does), then eos, as ChatGLM3's fine-tuning demo ends a dialogue.
- GLM-4: the published `chat_template` (through the tokenizer's `apply_chat_template`), each message on its
  own (the template renders each message independently and every message starts with its role token, so the
  pieces concatenate to the whole), then `<|user|>` to end the dialogue, as GLM-4's fine-tuning demo does.

Every assistant message (a text answer or a tool call) is supervised: the tokens after its role token and the
role token (or end token) that ends it, as both demos shift their loss masks by one. A message with
`"loss": false` is not.

A tool call is an assistant message whose metadata is the tool's name and whose content is the arguments
(see tool_calls.py); `parse_tool_call` reads a model's answer back into (name, arguments).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from glmtune.data.samples import IGNORE_INDEX
from glmtune.data.tool_calls import (
    CHATGLM3_TOOLS_PROMPT,
    chatglm3_call_content,
    parse_chatglm3_arguments,
)

Message = Mapping[str, Any]


def is_chatglm3(tokenizer: PreTrainedTokenizerBase) -> bool:
    # ChatGLM3's tokenizer builds messages itself; GLM-4's (published or transformers-native) renders them
    # with its chat_template, the published rendering.
    return hasattr(tokenizer, "build_single_message")


def tool_call_message(tokenizer: PreTrainedTokenizerBase, name: str, arguments: Mapping[str, Any]) -> dict:
    """The assistant message of a call to tool `name`, in the tokenizer's family's format."""
    if is_chatglm3(tokenizer):
        content = chatglm3_call_content(arguments)
    else:
        content = json.dumps(arguments, ensure_ascii=False)
    return {"role": "assistant", "metadata": name, "content": content}


def call_opening_ids(tokenizer: PreTrainedTokenizerBase, name: str) -> list[int]:
    """The ids after `<|assistant|>` that open a call to `name` (its metadata line): a prompt ending with them
    makes the model write that call's arguments."""
    if is_chatglm3(tokenizer):
        return tokenizer.build_single_message("assistant", name, "")[1:]
    return list(tokenizer.encode(f"{name}\n", add_special_tokens=False))


def tools_system_message(
    tokenizer: PreTrainedTokenizerBase, tools: Sequence[Mapping[str, Any]], system: str | None = None
) -> dict:
    """The system message that offers OpenAI-style tools (`{"type": "function", "function": {...}}`): ChatGLM3
    lists the functions under its demos' tool prompt, GLM-4's chat_template takes the typed tools."""
    if is_chatglm3(tokenizer):
        functions = [tool["function"] for tool in tools]
        return {"role": "system", "content": system or CHATGLM3_TOOLS_PROMPT, "tools": functions}
    return {"role": "system", "content": system or "", "tools": list(tools)}


def parse_tool_call(
    tokenizer: PreTrainedTokenizerBase, answer: str, tool_names: Sequence[str]
) -> tuple[str, dict[str, Any]] | None:
    """(tool name, arguments) when the model's answer is a call to one of `tool_names`, else None.

    The answer is what generation decoded: the metadata line (the tool's name) then the arguments, as the
    published demos read it; anything else (an unknown name, arguments that do not parse) is a text answer.
    """
    name, newline, content = answer.strip().partition("\n")
    name = name.strip()
    if not newline or name not in tool_names:
        return None
    if is_chatglm3(tokenizer):
        arguments = parse_chatglm3_arguments(content)
    else:
        try:
            arguments = json.loads(content)
        except json.JSONDecodeError:
            arguments = None
    return (name, arguments) if isinstance(arguments, dict) else None


def offered_tool_names(messages: Sequence[Message]) -> list[str]:
    """The names of the tools the system messages offer (ChatGLM3's functions or GLM-4's typed tools)."""
    names = []
    for message in messages:
        for tool in message.get("tools") or [] if message.get("role") == "system" else []:
            function = tool.get("function", tool) if isinstance(tool, Mapping) else {}
            if isinstance(function, Mapping) and isinstance(function.get("name"), str):
                names.append(function["name"])
    return names


def answer_text(tokenizer: PreTrainedTokenizerBase, answer: str, tool_names: Sequence[str]) -> str:
    """An answer in one spelling, to compare answers: a call as `tool_call_message` writes it (name line,
    then the arguments), text stripped."""
    call = parse_tool_call(tokenizer, answer, tool_names)
    if call is None:
        return answer.strip()
    message = tool_call_message(tokenizer, *call)
    return f"{message['metadata']}\n{message['content']}"


def message_ids(tokenizer: PreTrainedTokenizerBase, message: Message) -> list[int]:
    """One message's ids in the tokenizer's family's chat format (no `[gMASK] sop`)."""
    if is_chatglm3(tokenizer):
        return tokenizer.build_message(message)
    return chat_template_message_ids(tokenizer, message)


def messages_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """The chat prompt of a tool-call dialogue: `[gMASK] sop`, every message, then `<|assistant|>` for the
    model to answer (a tool call or text), as the published chat formats prompt."""
    ids = list(tokenizer.build_inputs_with_special_tokens([]))
    for message in messages:
        ids += message_ids(tokenizer, message)
    return ids + [tokenizer.convert_tokens_to_ids("<|assistant|>")]


def chat_template_message_ids(tokenizer: PreTrainedTokenizerBase, message: Message) -> list[int]:
    """One message through the tokenizer's chat_template, without the `[gMASK]<sop>` it starts with."""
    tools = message.get("tools") or []
    if any(not isinstance(tool, Mapping) or "type" not in tool for tool in tools):
        # GLM-4's chat_template renders only typed tools ({"type": "function", "function": {...}}): an
        # untyped one (ChatGLM3's {"name", "description", "parameters"}) would be dropped from the prompt.
        raise ValueError(
            'GLM-4 tools need a "type" ({"type": "function", "function": {...}}); ChatGLM3-style tools '
            "(name/description/parameters) are for a ChatGLM3 template"
        )
    prefix = len(tokenizer.build_inputs_with_special_tokens([]))
    # keys with None values are left out: the template tests `is defined`, not truthiness, for tools
    clean = {k: v for k, v in message.items() if v is not None and k != "loss"}
    ids = tokenizer.apply_chat_template([clean], tokenize=True, add_generation_prompt=False)
    if isinstance(ids, Mapping):  # transformers versions that return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)[prefix:]


def build_messages_sample(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], label_first: bool = True
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole tool-call dialogue, every assistant message supervised.

    `label_first=False` leaves out the `\\n` after `<|assistant|>` in answers without metadata (GLM-4's demo
    with `combine: true` never supervises it); a tool call's function name, its metadata, is always learnt."""
    chatglm3 = is_chatglm3(tokenizer)
    ids = list(tokenizer.build_inputs_with_special_tokens([]))  # [gMASK] sop
    supervised: list[bool] = [False] * len(ids)
    unlabelled_firsts: list[int] = []
    for message in messages:
        piece = message_ids(tokenizer, message)
        learn = message["role"] == "assistant" and message.get("loss", True) is not False
        if learn and not label_first and not message.get("metadata"):
            unlabelled_firsts.append(len(ids) + 1)
        ids += piece
        supervised += [learn] * len(piece)
    ids.append(tokenizer.eos_token_id if chatglm3 else tokenizer.get_command("<|user|>"))
    # A token is learnt when the one before it belongs to a supervised message: the role token opening an
    # assistant message is not learnt, the token closing it is.
    labels = [t if i and supervised[i - 1] else IGNORE_INDEX for i, t in enumerate(ids)]
    for i in unlabelled_firsts:
        if i < len(labels):
            labels[i] = IGNORE_INDEX
    return ids, labels
