"""The HTTP API against a live server on localhost: the official `openai` client, ChatGLM's POST /, errors.

The engine itself is the oracle: each answer over HTTP must equal what `ChatEngine` answers for the same
conversation and settings (greedy, so deterministic).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")

from tests.serving.live_server import API_KEY  # noqa: E402

pytestmark = pytest.mark.slow  # the first test loads the model; the concurrency test generates 16 answers

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def client(server, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def post(server, path: str, *, headers: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}", headers=AUTH if headers is None else headers, timeout=120, **kwargs
    )


def error_message(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]["message"]


# --- OpenAI-compatible ----------------------------------------------------------------------------------------


def test_models_lists_the_served_model(api_server):
    models = client(api_server).models.list()
    assert [m.id for m in models.data] == ["tiny-test"]


def test_chat_completion_equals_the_engine_answer(api_server, engine):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "介绍一下北京"},
        {"role": "assistant", "content": "北京是中国的首都。"},
        {"role": "user", "content": "那上海呢？"},
    ]
    got = client(api_server).chat.completions.create(model="tiny-test", messages=messages, max_tokens=12)
    expected = engine.complete(
        "那上海呢？", [("介绍一下北京", "北京是中国的首都。")], "Answer briefly.", max_new_tokens=12
    )
    assert got.object == "chat.completion"
    assert got.model == "tiny-test"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected.text
    assert got.choices[0].finish_reason == expected.finish_reason
    assert got.usage.prompt_tokens == expected.prompt_tokens
    assert got.usage.completion_tokens == expected.completion_tokens
    assert got.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_system_message_changes_the_prompt(api_server, engine):
    """The system message reaches the template (the prompt gets longer)."""
    api = client(api_server)
    plain = api.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "你好"}], max_tokens=1
    )
    with_system = api.chat.completions.create(
        model="m",
        messages=[{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "你好"}],
        max_tokens=1,
    )
    assert plain.usage.prompt_tokens == len(engine.prompt_ids("你好"))
    assert with_system.usage.prompt_tokens == len(engine.prompt_ids("你好", [], "你是一个助手"))
    assert with_system.usage.prompt_tokens > plain.usage.prompt_tokens


def test_streaming_sends_chunks_that_add_up_to_the_answer(api_server):
    api = client(api_server)
    messages = [{"role": "user", "content": "写一首诗"}]
    whole = api.chat.completions.create(model="m", messages=messages, max_tokens=16)
    chunks = list(
        api.chat.completions.create(
            model="m", messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 2, "the answer came in one piece: not streamed"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in content_chunks) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_is_server_sent_events_ending_with_done(api_server):
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST", f"{api_server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events), events
    assert events[-1] == "data: [DONE]"
    assert events.count("data: [DONE]") == 1
    for line in events[:-1]:
        assert json.loads(line[len("data: ") :])["object"] == "chat.completion.chunk"


def test_stop_strings_cut_the_answer_streaming_or_not(api_server, engine):
    full = engine.complete("讲个故事", max_new_tokens=24).text
    assert len(full) >= 6, f"the tiny model's answer is too short to pick a stop string from: {full!r}"
    stop = full[4:6]
    expected = full[: full.find(stop)].strip()
    api = client(api_server)
    messages = [{"role": "user", "content": "讲个故事"}]
    got = api.chat.completions.create(model="m", messages=messages, max_tokens=24, stop=[stop])
    assert got.choices[0].message.content == expected
    assert got.choices[0].finish_reason == "stop"
    streamed = api.chat.completions.create(
        model="m", messages=messages, max_tokens=24, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_wrong_and_missing_key_get_401(api_server):
    with pytest.raises(openai.AuthenticationError):
        client(api_server, key="wrong-key").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
    body = {"messages": [{"role": "user", "content": "hi"}]}
    for headers in (
        {},
        {"Authorization": API_KEY},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic x"},
    ):
        response = post(api_server, "/v1/chat/completions", headers=headers, json=body)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert "API key" in error_message(response)
    assert post(api_server, "/", headers={}, json={"prompt": "hi"}).status_code == 401
    assert httpx.get(f"{api_server.url}/v1/models", timeout=30).status_code == 401
    # The key is checked before the body: a client without it learns nothing about valid bodies.
    assert post(api_server, "/", headers={}, content=b"{not json").status_code == 401
    assert httpx.get(f"{api_server.url}/health", timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, "messages: Field required"),
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": "hello"}, "messages: Input should be a valid list"),
        ({"messages": [{"role": "user"}]}, "messages.0: content: required in a user message"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role: Input should be"),
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "temperature: Input should be",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
            "temperature: Input should be less",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens: Input should be greater",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "only n=1 is supported"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "the last message must come from the user",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},
            "messages.1: expected a 'assistant' message, got 'user'",
        ),
        ({"messages": [{"role": "system", "content": "x"}]}, "there is no user message"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content",
        ),
    ],
)
def test_invalid_chat_bodies_get_400_naming_the_problem(api_server, body, expected):
    response = post(api_server, "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert expected in error_message(response)


def test_malformed_json_and_wrong_content_type_get_400(api_server):
    for path in ("/", "/v1/chat/completions"):
        response = post(
            api_server,
            path,
            content=b'{"prompt": "hi",',
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert response.status_code == 400
        assert "malformed JSON" in error_message(response)
        response = post(
            api_server, path, content=b"prompt=hi", headers={**AUTH, "Content-Type": "text/plain"}
        )
        assert response.status_code == 400
        assert "Content-Type: application/json" in error_message(response)
    assert post(api_server, "/v1/nothing", json={}).status_code == 404


def test_over_long_prompt_gets_400_and_the_server_goes_on(api_server, engine):
    context = engine.context_length
    long_prompt = "这是一个很长的问题，" * (context // 2)
    assert len(engine.prompt_ids(long_prompt)) > context, "the prompt must exceed the context for this test"
    with pytest.raises(openai.BadRequestError, match="maximum context length is"):
        client(api_server).chat.completions.create(
            model="m", messages=[{"role": "user", "content": long_prompt}]
        )
    response = post(api_server, "/", json={"prompt": long_prompt})
    assert response.status_code == 400 and "maximum context length" in error_message(response)
    # prompt + max_tokens over the context, and ChatGLM's max_length above it, are refused too.
    with pytest.raises(openai.BadRequestError, match=f"{context} tokens"):
        client(api_server).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=context
        )
    assert post(api_server, "/", json={"prompt": "hi", "max_length": context + 1}).status_code == 400
    prompt_tokens = len(engine.prompt_ids("hi"))
    response = post(api_server, "/", json={"prompt": "hi", "max_length": prompt_tokens})
    assert response.status_code == 400 and "no room for an answer" in error_message(response)
    # Still serving.
    ok = client(api_server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert ok.choices[0].message.content == engine.complete("hi", max_new_tokens=2).text


# --- ChatGLM style --------------------------------------------------------------------------------------------


def test_chatglm_post_returns_response_history_status_time(api_server, engine):
    history = [["你好", "你好！有什么可以帮你？"]]
    response = post(api_server, "/", json={"prompt": "今天天气怎么样", "history": history})
    assert response.status_code == 200
    body = response.json()
    expected, expected_history = engine.chat("今天天气怎么样", [tuple(h) for h in history])
    assert body["response"] == expected
    assert body["history"] == [list(h) for h in expected_history]
    assert body["status"] == 200
    assert datetime.strptime(body["time"], "%Y-%m-%d %H:%M:%S")


def test_chatglm_max_length_counts_prompt_and_answer(api_server, engine):
    prompt_tokens = len(engine.prompt_ids("你好"))
    body = post(
        api_server,
        "/",
        json={
            "prompt": "你好",
            "history": None,
            "max_length": prompt_tokens + 5,
            "temperature": 0,
            "top_p": 0.7,
        },
    ).json()
    assert body["response"] == engine.complete("你好", max_new_tokens=5).text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, "prompt: Field required"),
        ({"prompt": 3}, "prompt: Input should be a valid string"),
        ({"prompt": "x", "history": [["only one"]]}, "history.0"),
        ({"prompt": "x", "history": "none"}, "history: Input should be a valid list"),
        ({"prompt": "x", "max_length": "long"}, "max_length: Input should be a valid integer"),
        ({"prompt": "x", "top_p": 0}, "top_p: Input should be greater than 0"),
        ([1, 2], "body: Input should be a valid dictionary"),
    ],
)
def test_invalid_chatglm_bodies_get_400(api_server, body, expected):
    response = post(api_server, "/", json=body)
    assert response.status_code == 400, response.text
    assert expected in error_message(response)


# --- concurrency ----------------------------------------------------------------------------------------------


def _ask(server, prompt: str, stream: bool) -> str:
    api = client(server)
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        return (
            api.chat.completions.create(model="m", messages=messages, max_tokens=12)
            .choices[0]
            .message.content
        )
    chunks = api.chat.completions.create(model="m", messages=messages, max_tokens=12, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_eight_concurrent_clients_each_get_their_own_answer(api_server):
    prompts = [
        "你好",
        "北京在哪里",
        "1+1等于几",
        "讲个笑话",
        "what is AI",
        "推荐一本书",
        "今天星期几",
        "晚饭吃什么",
    ]
    alone = [_ask(api_server, p, stream=False) for p in prompts]
    assert len(set(alone)) >= 4, (
        f"the prompts must give different answers for this test to mean much: {alone}"
    )
    start = threading.Barrier(len(prompts))

    def ask_together(i: int) -> str:
        start.wait()  # all eight requests in flight at once
        return _ask(api_server, prompts[i], stream=i % 2 == 1)  # half of them streaming

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask_together, range(len(prompts))))
    assert together == alone


def test_generation_does_not_block_the_event_loop(api_server):
    """While one long answer streams, the server still answers other requests at once."""
    first_token = threading.Event()
    finished = threading.Event()

    def long_stream() -> None:
        body = {"messages": [{"role": "user", "content": "写一篇长文章"}], "max_tokens": 400, "stream": True}
        with httpx.stream(
            "POST", f"{api_server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=300
        ) as response:
            for line in response.iter_lines():
                if '"content"' in line:
                    first_token.set()
        finished.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    try:
        assert first_token.wait(120), "the long stream never started"
        health = httpx.get(f"{api_server.url}/health", timeout=10)
        models = httpx.get(f"{api_server.url}/v1/models", headers=AUTH, timeout=10)
        answered_while_streaming = not finished.is_set()
    finally:
        thread.join(300)
    assert health.status_code == 200 and models.status_code == 200
    assert answered_while_streaming, "the other requests waited for the stream to end"


# --- the engine under the server ------------------------------------------------------------------------------


def test_stream_stops_generating_at_a_stop_string(engine):
    full = engine.complete("讲个故事", max_new_tokens=32)
    assert len(full.text) >= 6, (
        f"the tiny model's answer is too short to pick a stop string from: {full.text!r}"
    )
    stop = full.text[4:6]
    stream = engine.stream_chat("讲个故事", max_new_tokens=32, stop=[stop])
    shown = []
    while True:
        try:
            shown.append(next(stream))
        except StopIteration as end:
            completion = end.value
            break
    assert completion.text == shown[-1].strip() == full.text[: full.text.find(stop)].strip()
    assert completion.finish_reason == "stop"
    # generate() was told to stop once the stop string showed up, instead of running to max_new_tokens.
    assert completion.completion_tokens < full.completion_tokens
    assert completion.prompt_tokens == full.prompt_tokens


def test_closing_a_stream_frees_the_model(engine):
    stream = engine.stream_chat("写一篇长文章", max_new_tokens=1000)
    next(stream)
    stream.close()
    assert engine._lock.acquire(blocking=False), (
        "generate() still holds the model after the stream was closed"
    )
    engine._lock.release()
