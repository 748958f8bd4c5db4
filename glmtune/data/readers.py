"""Read fine-tuning data files into `Dialogue`s, one reader per input format.

A file is either JSON lines (one record per line, streamed: a huge .jsonl is never held whole) or one JSON
array of records (parsed whole, with the line where each element starts kept for error messages). UTF-8,
with or without a byte-order mark. Which of the two is decided by the first non-blank character (`[`).

Formats (`format=` name, or "auto": decided per file from the first record's keys):

- `paragraph`: `{"id", "paragraph": [{"q", "a"}, ...]}`; `a` is a string or a list of lines joined by "\\n";
  several entries are the turns of one dialogue.
- `prompt_completion`: `{"prompt", "completion"}`.
- `alpaca`: `{"instruction", "input", "output", "history": [[q, a], ...], "system"}`; the query is
  instruction + "\\n" + input when input is not empty; `input`, `history` and `system` are optional.
- `conversations`: `{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}` (ShareGPT) or
  `{"messages": [{"role": "user"|"assistant"|"system", "content"}]}` (OpenAI); an optional system turn
  first, then strictly alternating user/assistant turns, ending with an assistant turn.
- `input_target`: `{"input", "target"}` (PromptCBLUE); other fields are ignored.
- `chatglm3_tools`: ChatGLM3's tool-call fine-tuning data, `{"tools", "conversations": [{"role", "content"},
  {"role": "tool", "name", "parameters", "observation"}...]}`; `glm4_tools`: GLM-4's, `{"messages": [...]}`
  with `tools` on the system message and `observation` messages. "conversations" reads both too, a record at
  a time. The messages are kept whole (`Dialogue.meta["messages"]`) and need a ChatGLM3 / GLM-4 template.

Bad input raises `DataError` with `FILE:LINE` and the field in its message; with `errors="yield"` the
error is yielded in place of the record instead, so a caller can skip it and keep reading.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from glmtune.data.tool_calls import CHATGLM3_TOOLS_PROMPT, chatglm3_call_content

FormatName = Literal[
    "paragraph",
    "prompt_completion",
    "alpaca",
    "conversations",
    "input_target",
    "chatglm3_tools",
    "glm4_tools",
]
FORMATS: tuple[str, ...] = (
    "paragraph",
    "prompt_completion",
    "alpaca",
    "conversations",
    "input_target",
    "chatglm3_tools",
    "glm4_tools",
)

_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, as decoded by "surrogateescape"


class DataError(ValueError):
    """A bad record: `source` is "FILE:LINE", `field` the offending field (or None), `raw` the record text."""

    def __init__(self, source: str, message: str, field: str | None = None, raw: str | None = None):
        self.source = source
        self.field = field
        self.raw = raw
        self.reason = message
        where = f"{source}: field {field!r}: " if field else f"{source}: "
        super().__init__(where + message)

    def __reduce__(self):  # picklable across worker processes despite the custom signature
        return (DataError, (self.source, self.reason, self.field, self.raw))


@dataclass
class Dialogue:
    """One training example: (query, answer) turns in order, an optional system prompt, and where it came from."""

    turns: list[tuple[str, str]]
    system: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Field checks shared by the format parsers. `src` is "FILE:LINE" for messages.


def _get(obj: dict, key: str, src: str, *, kind: type | tuple[type, ...] = str, required: bool = True) -> Any:
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(src, "missing", key)
        return None
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(src, f"expected {want}, got {type(value).__name__}", key)
    return value


def _answer(value: Any, src: str, name: str) -> str:
    """A non-empty answer: a string, or a list of strings joined by newlines."""
    if isinstance(value, list):
        if not all(isinstance(line, str) for line in value):
            raise DataError(src, "expected a string or a list of strings", name)
        value = "\n".join(value)
    elif not isinstance(value, str):
        raise DataError(src, f"expected a string or a list of strings, got {type(value).__name__}", name)
    if not value.strip():
        raise DataError(src, "empty answer", name)
    return value


def _text(value: Any, src: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(src, f"expected str, got {type(value).__name__}", name)
    return value


# ----------------------------------------------------------------------------------------------------------
# One parser per format: a decoded JSON object -> Dialogue.


def parse_paragraph(obj: dict, src: str) -> Dialogue:
    paragraph = _get(obj, "paragraph", src, kind=list)
    if not paragraph:
        raise DataError(src, "empty list", "paragraph")
    turns = []
    for i, turn in enumerate(paragraph):
        if not isinstance(turn, dict):
            raise DataError(src, f"expected an object, got {type(turn).__name__}", f"paragraph[{i}]")
        if "q" not in turn:
            raise DataError(src, "missing", f"paragraph[{i}].q")
        if "a" not in turn:
            raise DataError(src, "missing", f"paragraph[{i}].a")
        turns.append(
            (_text(turn["q"], src, f"paragraph[{i}].q"), _answer(turn["a"], src, f"paragraph[{i}].a"))
        )
    meta = {"id": obj["id"]} if "id" in obj else {}
    return Dialogue(turns=turns, source=src, meta=meta)


def parse_prompt_completion(obj: dict, src: str) -> Dialogue:
    prompt = _get(obj, "prompt", src)
    completion = _answer(_get(obj, "completion", src, kind=(str, list)), src, "completion")
    return Dialogue(turns=[(prompt, completion)], source=src)


def parse_alpaca(obj: dict, src: str) -> Dialogue:
    instruction = _get(obj, "instruction", src)
    extra = _get(obj, "input", src, required=False) or ""
    output = _answer(_get(obj, "output", src, kind=(str, list)), src, "output")
    history = _get(obj, "history", src, kind=list, required=False) or []
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise DataError(src, "expected a [query, answer] pair", f"history[{i}]")
        turns.append((_text(pair[0], src, f"history[{i}][0]"), _answer(pair[1], src, f"history[{i}][1]")))
    query = f"{instruction}\n{extra}" if extra else instruction
    turns.append((query, output))
    return Dialogue(turns=turns, system=_get(obj, "system", src, required=False) or None, source=src)


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def parse_conversations(obj: dict, src: str) -> Dialogue:
    if "conversations" in obj:
        name, role_key, text_key = "conversations", "from", "value"
    else:
        name, role_key, text_key = "messages", "role", "content"
    messages = _get(obj, name, src, kind=list)
    if not messages:
        raise DataError(src, "empty list", name)
    system = _get(obj, "system", src, required=False) or None
    turns: list[tuple[str, str]] = []
    query: str | None = None
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise DataError(src, f"expected an object, got {type(message).__name__}", where)
        if role_key not in message:
            raise DataError(src, "missing", f"{where}.{role_key}")
        if text_key not in message:
            raise DataError(src, "missing", f"{where}.{text_key}")
        role = _ROLES.get(message[role_key]) if isinstance(message[role_key], str) else None
        if role is None:
            raise DataError(src, f"unknown role {message[role_key]!r}", f"{where}.{role_key}")
        if role == "system":
            if i != 0:
                raise DataError(src, "a system message may only come first", f"{where}.{role_key}")
            system = _text(message[text_key], src, f"{where}.{text_key}") or None
        elif role == "user":
            if query is not None:
                raise DataError(src, "two user messages in a row", f"{where}.{role_key}")
            query = _text(message[text_key], src, f"{where}.{text_key}")
        else:
            if query is None:
                raise DataError(
                    src, "an assistant message without a user message before it", f"{where}.{role_key}"
                )
            turns.append((query, _answer(message[text_key], src, f"{where}.{text_key}")))
            query = None
    if query is not None or not turns:
        raise DataError(src, "the last message must be an assistant answer", name)
    return Dialogue(turns=turns, system=system, source=src)


def parse_input_target(obj: dict, src: str) -> Dialogue:
    query = _get(obj, "input", src)
    target = _answer(_get(obj, "target", src, kind=(str, list)), src, "target")
    return Dialogue(turns=[(query, target)], source=src)


# ----------------------------------------------------------------------------------------------------------
# Tool-call dialogues: kept whole as published chat messages in `Dialogue.meta["messages"]` (the template
# renders and labels them, glmtune/tokenizers/tool_prompts.py); `turns` holds (message before, answer) for
# each assistant text, for reports and prediction.

_TOOL_ROLES = ("system", "user", "assistant", "observation")


def _chatglm3_tool_call(message: dict, src: str, where: str) -> list[dict[str, Any]]:
    """A ChatGLM3 demo `tool` message -> the assistant's call (`tool_call(k=v)` in a python block, the tool's
    name as metadata, as the demo formats it) and the observation (JSON unless a string)."""
    for key, kind in (("name", str), ("parameters", dict), ("observation", object)):
        if message.get(key) is None:
            raise DataError(src, "missing", f"{where}.{key}")
        if not isinstance(message[key], kind):
            raise DataError(
                src, f"expected {kind.__name__}, got {type(message[key]).__name__}", f"{where}.{key}"
            )
    observation = message["observation"]
    if not isinstance(observation, str):
        observation = json.dumps(observation, ensure_ascii=False)
    loss = {"loss": message["loss"]} if "loss" in message else {}
    return [
        {
            "role": "assistant",
            "metadata": message["name"],
            "content": chatglm3_call_content(message["parameters"]),
            **loss,
        },
        {"role": "observation", "content": observation},
    ]


def _tool_message(message: Any, src: str, where: str, roles: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise DataError(src, f"expected an object, got {type(message).__name__}", where)
    role = message.get("role")
    if role not in roles:
        raise DataError(src, f"unknown role {role!r}; expected one of {', '.join(roles)}", f"{where}.role")
    out: dict[str, Any] = {"role": role, "content": _text(message.get("content"), src, f"{where}.content")}
    for key, kind in (("metadata", str), ("tools", list), ("loss", bool)):
        if message.get(key) is not None:
            if not isinstance(message[key], kind):
                raise DataError(
                    src, f"expected {kind.__name__}, got {type(message[key]).__name__}", f"{where}.{key}"
                )
            out[key] = message[key]
    if "tools" in out and role != "system":
        raise DataError(src, "tools go on a system message", f"{where}.tools")
    if role == "assistant" and out.get("loss", True) and not out["content"].strip():
        raise DataError(src, "empty answer", f"{where}.content")
    return out


def _tool_dialogue(messages: list[dict[str, Any]], src: str, name: str) -> Dialogue:
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(src, "the last message must be an assistant answer", name)
    turns = [
        (before["content"], m["content"])
        for before, m in zip(messages, messages[1:])
        if m["role"] == "assistant" and before["role"] != "assistant"
    ]
    system = next((m["content"] for m in messages if m["role"] == "system" and m["content"]), None)
    return Dialogue(turns=turns, system=system, source=src, meta={"messages": messages})


def parse_chatglm3_tools(obj: dict, src: str) -> Dialogue:
    """ChatGLM3's fine-tuning format: `{"tools"?, "conversations": [{"role", "content"} | {"role": "tool",
    "name", "parameters", "observation"}]}`; assistant messages may carry `metadata` and observations come as
    `observation` messages too (the published history format)."""
    conversations = _get(obj, "conversations", src, kind=list)
    tools = _get(obj, "tools", src, kind=list, required=False)
    messages = [{"role": "system", "content": CHATGLM3_TOOLS_PROMPT, "tools": tools}] if tools else []
    for i, message in enumerate(conversations):
        where = f"conversations[{i}]"
        if isinstance(message, dict) and message.get("role") == "tool":
            messages += _chatglm3_tool_call(message, src, where)
        else:
            messages.append(_tool_message(message, src, where, _TOOL_ROLES))
    return _tool_dialogue(messages, src, "conversations")


def parse_glm4_tools(obj: dict, src: str) -> Dialogue:
    """GLM-4's fine-tuning format: `{"messages": [{"role", "content", "metadata"?, "tools"?}]}`, tools on the
    system message (`{"type": "function", "function": {...}}`), tool results as `observation` messages."""
    raw = _get(obj, "messages", src, kind=list)
    messages = [_tool_message(m, src, f"messages[{i}]", _TOOL_ROLES) for i, m in enumerate(raw)]
    return _tool_dialogue(messages, src, "messages")


def _has_tool_calls(obj: dict) -> bool:
    """Whether a `conversations` / `messages` record is tool-call data rather than a plain chat."""
    if "conversations" in obj:
        items = obj["conversations"]
        return "tools" in obj or (
            isinstance(items, list) and any(isinstance(m, dict) and "role" in m for m in items)
        )
    items = obj.get("messages")
    return isinstance(items, list) and any(
        isinstance(m, dict) and ("tools" in m or "metadata" in m or m.get("role") == "observation")
        for m in items
    )


def parse_conversations_or_tools(obj: dict, src: str) -> Dialogue:
    """The `conversations` format: a plain chat, or tool-call data in ChatGLM3's or GLM-4's format."""
    if not _has_tool_calls(obj):
        return parse_conversations(obj, src)
    return parse_chatglm3_tools(obj, src) if "conversations" in obj else parse_glm4_tools(obj, src)


PARSERS: dict[str, Callable[[dict, str], Dialogue]] = {
    "paragraph": parse_paragraph,
    "prompt_completion": parse_prompt_completion,
    "alpaca": parse_alpaca,
    "conversations": parse_conversations_or_tools,
    "input_target": parse_input_target,
    "chatglm3_tools": parse_chatglm3_tools,
    "glm4_tools": parse_glm4_tools,
}


def detect_format(obj: Any) -> str | None:
    """The format a record's keys say it is in, or None. `alpaca` is tested before `input_target`
    because both have an `input` key."""
    if not isinstance(obj, dict):
        return None
    if "paragraph" in obj:
        return "paragraph"
    if "conversations" in obj or "messages" in obj:
        return "conversations"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "input" in obj and "target" in obj:
        return "input_target"
    return None


# ----------------------------------------------------------------------------------------------------------
# Raw records: (line, decoded object, record text) or a DataError, from JSON lines or a JSON array.


def is_json_array(path: str | os.PathLike) -> bool:
    """Whether a data file is one JSON array (else JSON lines): its first non-blank character is `[`."""
    with open(path, "rb") as f:
        head = f.read(4096)
        while head:
            stripped = head.removeprefix(_BOM).lstrip()
            if stripped:
                return stripped[:1] == b"["
            head = f.read(4096)
    return False


def decode_json_line(raw: bytes, lineno: int, name: str) -> tuple[Any, str] | DataError | None:
    """One line of a JSON lines file, as read in binary (line 1 may start with a byte-order mark): (object,
    record text), a DataError (not UTF-8, invalid JSON) or None for a blank line. `name` is the file."""
    if lineno == 1:
        raw = raw.removeprefix(_BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataError(
            f"{name}:{lineno}",
            f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
            raw=raw.decode("utf-8", "replace").rstrip("\r\n"),
        )
    if not text.strip():
        return None
    try:
        return json.loads(text), text.rstrip("\r\n")
    except json.JSONDecodeError as e:
        hint = ""
        if e.pos >= len(text.rstrip()):  # the record goes on past the line: pretty-printed JSON?
            hint = " (JSON lines need one whole record per line; pretty-printed records go in a JSON array)"
        return DataError(
            f"{name}:{lineno}", f"invalid JSON: {e.msg} at column {e.colno}{hint}", raw=text.rstrip("\r\n")
        )


def _iter_json_lines(path: Path, name: str) -> Iterator[tuple[int, Any, str] | DataError]:
    with open(path, "rb") as f:  # binary iteration: one line in memory at a time
        for lineno, raw in enumerate(f, 1):
            decoded = decode_json_line(raw, lineno, name)
            if decoded is None:
                continue
            yield decoded if isinstance(decoded, DataError) else (lineno, *decoded)


def iter_line_chunks(
    path: str | os.PathLike, size: int, max_bytes: int = 1 << 17
) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the first line, raw lines) of a JSON lines file, in order, `size` lines at a time or fewer
    when they reach `max_bytes` (long records: the chunks in flight stay small). Reading without decoding, so
    that the decoding can be spread over processes (see `parse_json_lines`)."""
    with open(path, "rb") as f:
        lineno, lines, nbytes = 1, [], 0
        for raw in f:
            lines.append(raw)
            nbytes += len(raw)
            if len(lines) >= size or nbytes >= max_bytes:
                yield lineno, lines
                lineno, lines, nbytes = lineno + len(lines), [], 0
        if lines:
            yield lineno, lines


def _iter_json_array(path: Path, name: str) -> Iterator[tuple[int, Any, str] | DataError]:
    # Non-UTF-8 bytes become lone surrogates, so one bad element is reported (and skippable) on its own line.
    data = path.read_bytes().removeprefix(_BOM)
    text = data.decode("utf-8", "surrogateescape")
    del data
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end() + 1  # past "["
    line, counted = 1, 0  # line number of position `counted`, updated incrementally

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    index = 0
    pos = ws.match(text, pos).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # The array's structure is broken: nothing after this point can be trusted.
            yield DataError(
                f"{name}:{e.lineno}", f"invalid JSON in element {index}: {e.msg} at column {e.colno}"
            )
            return
        element = text[pos:end]
        bad = _SURROGATE.search(element)
        if bad:
            yield DataError(
                f"{name}:{line_at(pos + bad.start())}",
                f"not UTF-8 (element {index})",
                raw=element.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
            )
        else:
            yield line_at(pos), obj, element
        index += 1
        pos = ws.match(text, end).end()
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            yield DataError(
                f"{name}:{line_at(pos)}", f"invalid JSON: expected ',' or ']' after element {index - 1}"
            )
            return
        pos = ws.match(text, pos + 1).end()


def iter_json_records(path: str | os.PathLike) -> Iterator[tuple[int, Any, str] | DataError]:
    """(line, object, record text) for every record of a JSON lines or JSON array file, or a DataError for a
    record that is not valid UTF-8 JSON."""
    path = Path(path)
    name = str(path)
    reader = _iter_json_array if is_json_array(path) else _iter_json_lines
    return reader(path, name)


class DialogueParser:
    """Decoded records of one file -> `Dialogue`s (or the `DataError` of a bad record), in file order.

    With format "auto", the format is decided by the first record that is an object with recognisable keys,
    and kept for the rest of the file; `format` says the one in use ("auto" until then).
    """

    def __init__(self, name: str, format: str = "auto"):
        if format != "auto" and format not in PARSERS:
            raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)} or 'auto'")
        self.name = name
        self.format = format

    def __call__(self, lineno: int, obj: Any, raw: str) -> Dialogue | DataError:
        src = f"{self.name}:{lineno}"
        try:
            if not isinstance(obj, dict):
                raise DataError(src, f"expected a JSON object, got {type(obj).__name__}", raw=raw)
            if self.format == "auto":
                detected = detect_format(obj)
                if detected is None:
                    raise DataError(
                        src,
                        f"cannot tell the data format from the keys {sorted(obj)}; set format= to one of "
                        + ", ".join(FORMATS),
                        raw=raw,
                    )
                self.format = detected
            return PARSERS[self.format](obj, src)
        except DataError as e:
            e.raw = raw
            return e


def parse_json_lines(
    name: str, lines: Iterable[bytes], first_line: int, format: str = "auto"
) -> list[Dialogue | DataError]:
    """The dialogues (and errors) of consecutive raw lines of JSON lines file `name`, the first being line
    `first_line`: what `iter_dialogues(name, format, errors="yield")` yields for those lines when `format` is
    the file's format, or "auto" for lines up to the one that decides it."""
    parse = DialogueParser(name, format)
    items: list[Dialogue | DataError] = []
    for lineno, raw in enumerate(lines, first_line):
        decoded = decode_json_line(raw, lineno, name)
        if decoded is None:
            continue
        items.append(decoded if isinstance(decoded, DataError) else parse(lineno, *decoded))
    return items


def iter_dialogues(
    path: str | os.PathLike,
    format: str = "auto",
    errors: Literal["raise", "yield"] = "raise",
) -> Iterator[Dialogue | DataError]:
    """Stream the `Dialogue`s of one file. With `errors="yield"`, a bad record yields its `DataError` (with
    `.source`, `.field`, `.raw`) and reading goes on; with "raise" the first bad record raises it.
    `format="auto"` decides the format from the first record that decodes, for the whole file."""
    parse = DialogueParser(f"{path}", format)
    for item in iter_json_records(path):
        result = item if isinstance(item, DataError) else parse(*item)
        if isinstance(result, DataError) and errors == "raise":
            raise result
        yield result


def read_dialogues(path: str | os.PathLike, format: str = "auto") -> list[Dialogue]:
    """All dialogues of a (small) file; raises DataError on the first bad record."""
    return [d for d in iter_dialogues(path, format) if isinstance(d, Dialogue)]
