"""Dialogue -> (input_ids, labels) samples through a chat `Template`, and what the build learns by probing the
template: the hash of its rendering (for the records' cache key) and the length of its answer header.

A sample's labels are IGNORE_INDEX on the tokens the loss skips (the prompt) and the token ids on the ones it
scores (the answer and its end-of-answer token).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from glmtune.data.readers import DataError, Dialogue

# The label of a token the loss skips (PyTorch's cross_entropy default ignore_index).
IGNORE_INDEX = -100

MultiTurn = Literal["per_turn", "dialogue"]
Sample = tuple[list[int], list[int]]


@runtime_checkable
class Template(Protocol):
    """What the data pipeline needs from a chat prompt builder (glmtune/tokenizers/prompts.py).

    `build_train_sample` returns (input_ids, labels) with labels IGNORE_INDEX (-100) on the prompt and the
    token ids on the answer and its end-of-answer token. Optional extras, looked up with getattr:

    - `build_dialogue_sample(turns) -> (input_ids, labels)`: one sample supervising every answer
      (needed for multi_turn="dialogue"), and `dialogue_unsupported: str | None`, the reason a template
      that has the method cannot use it (ChatGLM-6B: its prompt is read bidirectionally).
    - a `system` keyword argument on either method: the system prompt. Without it the system prompt is put
      before the first query, separated by a newline.
    - `name: str` (or `fingerprint`): identifies the prompt format in the records' cache key.
    - `protected_head` / `protected_tail: int`: how many tokens at the start / end of the prompt truncation and
      sliding windows must keep (e.g. 2 for ChatGLM2's `[gMASK] sop` prefix). Default 0. The tokens every
      prompt ends with (its answer header: `答：`, `[/INST]`, `<|assistant|>`...) are found by
      `answer_header_length` and kept too.
    """

    def build_train_sample(
        self, query: str, response: str, history: Sequence[tuple[str, str]] | None = None
    ) -> tuple[list[int], list[int]]: ...


def template_name(template: Any) -> str:
    for attr in ("fingerprint", "name"):
        value = getattr(template, attr, None)
        if isinstance(value, str) and value:
            return value
    cls = type(template)
    return f"{cls.__module__}.{cls.__qualname__}"


def _accepts(fn: Callable | None, name: str) -> bool:
    if fn is None:
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_samples(dialogue: Dialogue, template: Template, multi_turn: MultiTurn = "per_turn") -> list[Sample]:
    """The (input_ids, labels) samples of one dialogue: one per turn with the earlier turns as history
    ("per_turn"), or one for the whole dialogue supervising every answer ("dialogue")."""
    if "messages" in dialogue.meta:  # a tool-call dialogue: one sample, rendered by the template whole
        build_messages = getattr(template, "build_messages_sample", None)
        if build_messages is None:
            raise DataError(
                dialogue.source,
                f"tool-call data needs a ChatGLM3 or GLM-4 template, not {template_name(template)!r}",
            )
        try:
            ids, labels = build_messages(dialogue.meta["messages"])
        except ValueError as e:  # messages this template's format cannot render
            raise DataError(dialogue.source, str(e)) from e
        return [(list(ids), list(labels))]
    turns = list(dialogue.turns)
    method = (
        template.build_train_sample
        if multi_turn == "per_turn"
        else getattr(template, "build_dialogue_sample", None)
    )
    if method is None:
        raise TypeError(
            f"template {template_name(template)} has no build_dialogue_sample(); use multi_turn='per_turn'"
        )
    kwargs: dict[str, Any] = {}
    if dialogue.system:
        if _accepts(method, "system"):
            kwargs["system"] = dialogue.system
        else:
            turns[0] = (f"{dialogue.system}\n{turns[0][0]}", turns[0][1])
    if multi_turn == "dialogue":
        ids, labels = method(turns, **kwargs)
        return [(list(ids), list(labels))]
    samples = []
    for i, (query, answer) in enumerate(turns):
        ids, labels = method(query, answer, history=turns[:i] or None, **kwargs)
        samples.append((list(ids), list(labels)))
    return samples


# The dialogue every template renders for the records' cache key: two turns, Chinese and English, and a
# system prompt, so that a change to how the template renders a query, an answer, the history or the system
# prompt changes the key.
PROBE_DIALOGUE = Dialogue(
    turns=[
        ("你好，请介绍一下你自己。", "我是一个人工智能助手，很高兴认识你。"),
        ("What is 1 + 1?", "1 + 1 = 2."),
    ],
    system="You are a helpful assistant.",
    source="<template probe>",
)


def template_fingerprint(template: Template, multi_turn: MultiTurn) -> str:
    """Hash of what `template` renders on PROBE_DIALOGUE: the training samples (ids and labels) of
    `multi_turn`, and the chat prompt of the last turn (what inference shows the model) where the template has
    `build_chat_prompt`. The template's name alone would miss an edit to its code."""
    samples = build_samples(PROBE_DIALOGUE, template, multi_turn)
    rendered: dict[str, Any] = {
        "samples": [[[int(t) for t in ids], [int(t) for t in labels]] for ids, labels in samples]
    }
    chat_prompt = getattr(template, "build_chat_prompt", None)
    if callable(chat_prompt):
        *history, (query, _) = PROBE_DIALOGUE.turns
        prompt = chat_prompt(query, history, system=PROBE_DIALOGUE.system)
        rendered["chat_prompt"] = [int(t) for t in prompt.input_ids]
    return hashlib.sha256(json.dumps(rendered).encode()).hexdigest()[:16]


# Queries ending in different characters: what their prompts have in common at the end is the template's.
HEADER_PROBES = ("你好", "hello", "1 + 1 = ?")


def answer_header_length(template: Template) -> int:
    """How many tokens the template puts after every query, before the answer (ChatGLM2's `\\n\\n答：`,
    LLaMA-2's `[/INST]`, ChatGLM3's `<|assistant|>`, ChatGLM-6B's `[gMASK]`, after `答：` once there is
    history): the common end of the prompts of queries that end differently, without and with history.
    Cutting the prompt's tail must keep them, or training shows the model prompts that chat() never builds."""
    longest = 0
    for history in ([], [("你好", "好的。")]):
        prompts = []
        for query in HEADER_PROBES:
            dialogue = Dialogue(turns=[*history, (query, "好的。")], source="<template probe>")
            ids, labels = build_samples(dialogue, template)[-1]
            prompts.append(ids[: supervised_spans(labels)[-1][0]])
        n = 0
        while all(len(p) > n for p in prompts) and len({p[-1 - n] for p in prompts}) == 1:
            n += 1
        longest = max(longest, n)
    return longest


def supervised_spans(labels: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of supervised (!= -100) labels."""
    supervised = (np.asarray(labels) != IGNORE_INDEX).astype(np.int8)
    edges = np.diff(supervised, prepend=0, append=0)  # +1 where a run starts, -1 just after it ends
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))
