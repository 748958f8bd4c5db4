"""The text of a tool call in ChatGLM3's format, both ways: written for training and prompts, read back from a
model's answer.

ChatGLM3 calls a tool with an assistant message whose metadata is the tool's name and whose content is
`tool_call(k=v, ...)` in a python block. Its published `process_response` `eval`s that text, which lets a
model's output run code on the server; here it is parsed as a syntax tree and only literal values are taken.
(GLM-4's arguments are a JSON object: `json` reads and writes them.)
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

# The system message ChatGLM3's fine-tuning and API demos put first when there are tools.
CHATGLM3_TOOLS_PROMPT = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)


def chatglm3_call_content(arguments: Mapping[str, Any]) -> str:
    """A ChatGLM3 tool call's content, as its demos write it: `tool_call(k=v, ...)` in a python block."""
    keywords = [ast.keyword(arg=k, value=ast.Constant(v)) for k, v in arguments.items()]
    call = ast.unparse(ast.Call(func=ast.Name(id="tool_call"), args=[], keywords=keywords))
    return f"```python\n{call}\n```"


def parse_chatglm3_arguments(content: str) -> dict[str, Any] | None:
    """`tool_call(k=v, ...)` (in a python block) as {k: v}; None if the text is not exactly such a call with
    literal values."""
    code = content.strip()
    if code.startswith("```"):
        lines = code.split("\n")
        if len(lines) < 3 or lines[-1].strip() != "```":
            return None
        code = "\n".join(lines[1:-1])
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a NUL byte in the text
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        return None
    if call.args or any(k.arg is None for k in call.keywords):
        return None
    try:
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
