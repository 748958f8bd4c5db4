"""Tool calls over `/v1/chat/completions` on ChatGLM3 and GLM-4, through the official `openai` client.

The model is a scripted stand-in (`ScriptedModel`): it answers with fixed ids, as a model tuned on tool calls
would, and records the prompt it was given. So each test checks both directions: the OpenAI messages became
the published chat prompt (ChatGLM3: the published tokenizer's tool prompt in tool_chat_golden.json; GLM-4:
its published chat_template), and the model's answer came back as `tool_calls` (or as text when it is not a
call to an offered tool, never evaluated).
"""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from glmtune.data.tool_calls import chatglm3_call_content, parse_chatglm3_arguments  # noqa: E402
from glmtune.inference.engine import ChatEngine  # noqa: E402
from glmtune.serving.api import create_app  # noqa: E402
from glmtune.tokenizers.chatglm2 import ChatGLM3Tokenizer  # noqa: E402
from glmtune.tokenizers.glm4 import GLM4Tokenizer  # noqa: E402
from glmtune.tokenizers.template_choice import get_template  # noqa: E402
from tests.scripted_model import ScriptedModel  # noqa: E402

CHAT = "/v1/chat/completions"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市的天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def serve(tokenizer, template: str, answers: list[list[int]]) -> tuple[openai.OpenAI, ScriptedModel]:
    model = ScriptedModel(answers)
    engine = ChatEngine(model=model, tokenizer=tokenizer, template=get_template(template, tokenizer))
    http = TestClient(create_app(engine, model_name="m"), raise_server_exceptions=False)
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0), model


@pytest.fixture(scope="module")
def tok3(reference_dir) -> ChatGLM3Tokenizer:
    return ChatGLM3Tokenizer.from_pretrained(str(reference_dir / "chatglm3-6b-tiny"))


@pytest.fixture(scope="module")
def tok4(reference_dir) -> GLM4Tokenizer:
    return GLM4Tokenizer.from_pretrained(str(reference_dir / "glm-4-9b-chat-tiny"))


@pytest.fixture(scope="module")
def golden(reference_dir) -> dict:
    path = reference_dir / "chatglm3-6b-tiny" / "tool_chat_golden.json"
    return json.loads(path.read_text(encoding="utf-8"))


def chatglm3_answer(tok3, metadata: str, content: str, end: str) -> list[int]:
    """What a ChatGLM3 model generates after `<|assistant|>`: metadata line, content, the token ending it."""
    return tok3.build_single_message("assistant", metadata, content)[1:] + [tok3.get_command(end)]


def chat_template_ids(tok4, messages: list[dict]) -> list[int]:
    """The published chat_template's rendering, with the prompt for the assistant's answer."""
    ids = tok4.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def as_openai_tool(function: dict) -> dict:
    return {"type": "function", "function": function}


# ---------------------------------------------------------------- ChatGLM3


def test_chatglm3_tool_call_round_trip_through_the_openai_client(tok3, golden):
    system, user, call, observation = golden["history"]
    arguments = parse_chatglm3_arguments(call["content"])
    assert arguments == {"symbol": "10111"}
    script = [
        chatglm3_answer(tok3, call["metadata"], chatglm3_call_content(arguments), "<|observation|>"),
        chatglm3_answer(tok3, "", "股票10111的价格是12412。", "<|user|>"),
    ]
    client, model = serve(tok3, "chatglm3", script)
    tools = [as_openai_tool(f) for f in golden["tools"]]
    messages = [{"role": "user", "content": user["content"]}]

    first = client.chat.completions.create(model="m", messages=messages, tools=tools)
    # The prompt is the published tokenizer's: its tool prompt and the functions on a system message.
    assert model.prompts[0] == golden["user_prompt_ids"]
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (tool_call,) = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.id.startswith("call_")
    assert tool_call.function.name == "track"
    assert json.loads(tool_call.function.arguments) == {"symbol": "10111"}

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": observation["content"]},
    ]
    second = client.chat.completions.create(model="m", messages=messages, tools=tools)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "股票10111的价格是12412。"
    assert second.choices[0].message.tool_calls is None
    # The call goes back as ChatGLM3's OpenAI demo writes it (its content stripped), the result as an
    # observation, then <|assistant|>.
    history = [system, user, {**call, "content": call["content"].strip()}]
    expected = tok3.build_chat_ids(observation["content"], history=history, role="observation")
    assert model.prompts[1] == expected
    assert expected[: len(golden["user_prompt_ids"])] == golden["user_prompt_ids"]


def test_an_answer_that_is_not_a_literal_call_is_text_and_is_never_run(tok3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a short path in the answer, well inside the default answer budget
    marker = tmp_path / "ran"
    hostile = "```python\ntool_call(symbol=__import__('pathlib').Path('ran').touch())\n```"
    client, _ = serve(tok3, "chatglm3", [chatglm3_answer(tok3, "track", hostile, "<|observation|>")])
    tools = [as_openai_tool({"name": "track", "parameters": {}})]
    got = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], tools=tools, max_tokens=200
    )
    assert got.choices[0].finish_reason == "stop" and got.choices[0].message.tool_calls is None
    assert "tool_call(" in got.choices[0].message.content
    assert not marker.exists()


@pytest.mark.parametrize(
    "code",
    [
        "tool_call(a=__import__('os').getcwd())",
        "tool_call(**{'a': 1})",
        "tool_call(1)",
        "other(a=1)",
        "tool_call(a=(lambda: 1)())",
        "tool_call(a=f'{1}')",
        "tool_call(a=1) + 1",
        "tool_call(a=1\x00)",
        "(" * 10000,
    ],
)
def test_only_literal_keyword_calls_parse(code):
    assert parse_chatglm3_arguments(f"```python\n{code}\n```") is None


def test_literal_arguments_parse_back_to_what_was_written():
    arguments = {"city": "北京", "days": 3, "units": ["c", "f"], "detail": {"wind": True}, "none": None}
    assert parse_chatglm3_arguments(chatglm3_call_content(arguments)) == arguments


def test_a_named_tool_choice_writes_the_call_opening_into_the_prompt(tok3):
    opening = tok3.build_single_message("assistant", "get_weather", "")[1:]
    call = chatglm3_answer(tok3, "get_weather", chatglm3_call_content({"city": "北京"}), "<|observation|>")
    client, model = serve(tok3, "chatglm3", [call[len(opening) :]])
    choice = {"type": "function", "function": {"name": "get_weather"}}
    got = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "北京天气"}], tools=[WEATHER], tool_choice=choice
    )
    assert model.prompts[0][-len(opening) - 1 :] == [tok3.get_command("<|assistant|>"), *opening]
    assert got.choices[0].finish_reason == "tool_calls"
    assert json.loads(got.choices[0].message.tool_calls[0].function.arguments) == {"city": "北京"}


# ---------------------------------------------------------------- GLM-4


def test_glm4_tool_call_round_trip_is_the_published_chat_template(tok4):
    arguments = '{"city": "北京"}'
    answer = tok4.encode(f"get_weather\n{arguments}", add_special_tokens=False)
    text = tok4.encode("\n北京今天晴。", add_special_tokens=False)
    script = [answer + [tok4.get_command("<|observation|>")], text + [tok4.get_command("<|user|>")]]
    client, model = serve(tok4, "glm4", script)
    messages = [
        {"role": "system", "content": "回答要简短。"},
        {"role": "user", "content": "北京天气怎么样？"},
    ]

    first = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER])
    published = [
        {"role": "system", "content": "回答要简短。", "tools": [WEATHER]},
        {"role": "user", "content": "北京天气怎么样？"},
    ]
    assert model.prompts[0] == chat_template_ids(tok4, published)
    (tool_call,) = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls"
    assert (tool_call.function.name, json.loads(tool_call.function.arguments)) == (
        "get_weather",
        {"city": "北京"},
    )

    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": '{"weather": "晴"}'},
    ]
    second = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER])
    assert second.choices[0].message.content == "北京今天晴。"
    published += [
        {"role": "assistant", "metadata": "get_weather", "content": arguments},
        {"role": "observation", "content": '{"weather": "晴"}'},
    ]
    assert model.prompts[1] == chat_template_ids(tok4, published)


def test_glm4_streams_a_tool_call_as_one_delta(tok4):
    answer = tok4.encode('get_weather\n{"city": "上海"}', add_special_tokens=False)
    client, _ = serve(tok4, "glm4", [answer + [tok4.get_command("<|observation|>")]])
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "上海呢"}], tools=[WEATHER], stream=True
    )
    chunks = list(stream)
    calls = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "上海"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_glm4_a_call_to_a_tool_not_offered_is_text(tok4):
    answer = tok4.encode('delete_everything\n{"really": true}', add_special_tokens=False)
    client, _ = serve(tok4, "glm4", [answer + [tok4.get_command("<|observation|>")]])
    got = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER]
    )
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].message.content == 'delete_everything\n{"really": true}'


def test_glm4_a_call_cut_off_by_max_tokens_is_reported_as_cut_text(tok4):
    answer = tok4.encode('get_weather\n{"city": "上海"}', add_special_tokens=False)
    client, _ = serve(tok4, "glm4", [answer])  # no <|observation|>: the budget ran out first
    got = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "上海呢"}], tools=[WEATHER], max_tokens=len(answer)
    )
    assert got.choices[0].finish_reason == "length"
    assert got.choices[0].message.content == 'get_weather\n{"city": "上海"}'


# ---------------------------------------------------------------- refusals


def refusal(client: openai.OpenAI, **body) -> str:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", **body)
    return err.value.body["message"]


def test_tools_on_a_model_without_a_tool_format_are_refused(engine):
    http = TestClient(create_app(engine, model_name="m"), raise_server_exceptions=False)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    message = refusal(client, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert "has no tool-call format" in message and "chatglm2" in message


def test_bad_tool_requests_get_400_naming_the_field(tok4):
    client, model = serve(tok4, "glm4", [])
    hi = [{"role": "user", "content": "hi"}]
    assert "required" in refusal(client, messages=hi, tools=[WEATHER], tool_choice="required")
    named = {"type": "function", "function": {"name": "nope"}}
    assert "'nope', which is not in tools" in refusal(client, messages=hi, tools=[WEATHER], tool_choice=named)
    bad_call = {
        "role": "assistant",
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "[1]"}}
        ],
    }
    tool_result = {"role": "tool", "tool_call_id": "c", "content": "{}"}
    message = refusal(client, messages=[*hi, bad_call, tool_result], tools=[WEATHER])
    assert "messages.1.tool_calls.0.function.arguments: the arguments must be a JSON object" in message
    assert "must come from the user or a tool" in refusal(
        client, messages=[*hi, {"role": "assistant", "content": "x"}], tools=[WEATHER]
    )
    assert "content: required in a tool message" in refusal(
        client, messages=[*hi, {"role": "tool", "tool_call_id": "c"}], tools=[WEATHER]
    )
    assert model.prompts == []
