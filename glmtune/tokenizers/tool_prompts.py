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
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from glmtune.data.samples import IGNORE_INDEX

Message = Mapping[str, Any]


def _is_chatglm3(tokenizer: PreTrainedTokenizerBase) -> bool:
    # ChatGLM3's tokenizer builds messages itself; GLM-4's (published or transformers-native) renders them
    # with its chat_template, the published rendering.
    return hasattr(tokenizer, "build_single_message")


def chatglm3_message_ids(tokenizer: Any, message: Message) -> list[int]:
    """One ChatGLM3 message as the published tokenizer's `build_chat_input` writes it in a history."""
    content = message["content"]
    if message["role"] == "system" and message.get("tools") is not None:
        content = content + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
    return tokenizer.build_single_message(message["role"], message.get("metadata") or "", content)


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
    chatglm3 = _is_chatglm3(tokenizer)
    ids = list(tokenizer.build_inputs_with_special_tokens([]))  # [gMASK] sop
    supervised: list[bool] = [False] * len(ids)
    unlabelled_firsts: list[int] = []
    for message in messages:
        piece = (
            chatglm3_message_ids(tokenizer, message)
            if chatglm3
            else chat_template_message_ids(tokenizer, message)
        )
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
