"""GLM-4-9B-Chat served by infer_api.py from its published folder: the OpenAI client's answers, streamed or
not, are the engine's answers for the same messages (greedy), and the server takes tools for it."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")

from tests.serving.live_server import script_server  # noqa: E402
from tests.serving.test_tool_calls import WEATHER  # noqa: E402


@pytest.mark.slow
def test_infer_api_serves_the_glm4_folder(reference_dir):
    from glmtune.config import build_parser, parse_args
    from glmtune.inference.artifacts import load_base

    flags = ["--model.path", str(reference_dir / "glm-4-9b-chat-tiny")]
    engine = load_base(parse_args(build_parser("test"), flags)[0])
    assert engine.template.name == "glm4"
    messages = [{"role": "system", "content": "回答要简短。"}, {"role": "user", "content": "你好"}]
    expected = engine.complete("你好", [], "回答要简短。", max_new_tokens=8)

    with script_server(*flags) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=120)
        got = client.chat.completions.create(model="m", messages=messages, max_tokens=8)
        stream = client.chat.completions.create(model="m", messages=messages, max_tokens=8, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        with_tools = client.chat.completions.create(
            model="m", messages=messages, max_tokens=8, tools=[WEATHER]
        )
    assert live.returncode == [0], live.output
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == (
        expected.text,
        expected.finish_reason,
    )
    assert got.usage.prompt_tokens == expected.prompt_tokens
    assert streamed == expected.text
    # The tools are in the prompt (random weights answer with text, not a call).
    assert with_tools.usage.prompt_tokens > expected.prompt_tokens
    assert with_tools.choices[0].finish_reason in ("stop", "length", "tool_calls")
