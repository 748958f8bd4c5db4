"""Hostile input and safe defaults, through FastAPI's test client: never a 500, errors in OpenAI's shape.

Each test is one row of "serving that holds": tiny temperatures, text no tokenizer can encode, too many or too
long stop strings, oversized bodies, a failing generation, the key on every route, the Host allow-list, and
infer_api.py refusing unsafe settings before it loads anything.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from glmtune.config import (
    ConfigError,  # noqa: E402
    parse_args,  # noqa: E402
)
from glmtune.serving.api import create_app  # noqa: E402
from glmtune.serving.guards import host_name  # noqa: E402
from glmtune.serving.launch import (  # noqa: E402
    allowed_hosts,
    api_parser,
    check_auth,
    main,
    read_api_key,
    serving_limits,
)
from glmtune.serving.limits import ServingLimits  # noqa: E402
from glmtune.serving.schemas import MAX_STOP_CHARS, MAX_STOPS  # noqa: E402

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def api(engine) -> TestClient:
    return TestClient(create_app(engine, model_name="m"), raise_server_exceptions=False)


def openai_error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def sse_events(response) -> list[str]:
    return [line for line in response.text.splitlines() if line.startswith("data: ")]


def streamed_text(events: list[str]) -> str:
    chunks = [json.loads(e[len("data: ") :]) for e in events if e != "data: [DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-6])
def test_tiny_temperatures_are_greedy(api, engine, temperature):
    greedy = engine.complete("你好", max_new_tokens=8).text
    body = {"messages": HI, "max_tokens": 8, "temperature": temperature}
    response = api.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == greedy
    streamed = api.post(CHAT, json={**body, "stream": True})
    events = sse_events(streamed)
    assert events[-1] == "data: [DONE]" and streamed_text(events) == greedy
    chatglm = api.post("/", json={"prompt": "你好", "max_length": 64, "temperature": temperature})
    assert chatglm.status_code == 200, chatglm.text


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
        ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', "messages.0"),
        ('{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}', "stop"),
        ('{"prompt": "\\ud800"}', "prompt"),
        ('{"prompt": "hi", "history": [["\\ud800", "ok"]]}', "history.0.0"),
    ],
)
def test_text_that_cannot_be_encoded_is_a_400_naming_the_field(api, raw, field):
    path = "/" if raw.startswith('{"prompt"') else CHAT
    response = api.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = openai_error(response)
    assert field in error["message"] and "surrogate" in error["message"], error


def test_stop_strings_are_bounded_in_number_and_length(api):
    too_many = api.post(CHAT, json={"messages": HI, "stop": [f"s{i}" for i in range(MAX_STOPS + 1)]})
    assert too_many.status_code == 400 and f"at most {MAX_STOPS}" in openai_error(too_many)["message"]
    too_long = api.post(CHAT, json={"messages": HI, "stop": ["x" * (MAX_STOP_CHARS + 1)]})
    assert too_long.status_code == 400 and f"{MAX_STOP_CHARS} characters" in openai_error(too_long)["message"]
    at_the_bounds = ["x" * MAX_STOP_CHARS] + [f"\u2603{i}" for i in range(MAX_STOPS - 1)]
    assert api.post(CHAT, json={"messages": HI, "max_tokens": 2, "stop": at_the_bounds}).status_code == 200


def test_a_body_over_the_limit_is_413_before_it_is_parsed(engine):
    api = TestClient(create_app(engine, limits=ServingLimits(max_body_bytes=1000)))
    big = {"messages": [{"role": "user", "content": "x" * 2000}]}
    response = api.post(CHAT, json=big)
    assert response.status_code == 413
    assert "1000 bytes" in openai_error(response)["message"]
    # Sent in chunks without a Content-Length, the body is counted as it arrives.
    chunked = api.post(CHAT, content=iter([b"{" + b" " * 600, b" " * 600 + b"}"]))
    assert chunked.status_code == 413
    assert api.post(CHAT, json={"messages": HI, "max_tokens": 2}).status_code == 200


def test_the_default_body_limit_is_4_mib(api):
    response = api.post(CHAT, json={"messages": [{"role": "user", "content": "x" * (4 * 1024 * 1024)}]})
    assert response.status_code == 413


class Boom(RuntimeError):
    pass


def test_a_failing_generation_says_nothing_of_the_internals(engine, monkeypatch):
    api = TestClient(create_app(engine), raise_server_exceptions=False)

    def fails(*args, **kwargs):
        raise Boom("secret internal detail")

    monkeypatch.setattr(engine, "generate_rows", fails)
    response = api.post(CHAT, json={"messages": HI})
    assert response.status_code == 500
    error = openai_error(response)
    assert error["type"] == "server_error" and "secret" not in response.text
    assert api.post("/", json={"prompt": "hi"}).status_code == 500
    events = sse_events(api.post(CHAT, json={"messages": HI, "stream": True}))
    assert events[-1] == "data: [DONE]"
    failure = json.loads(events[-2][len("data: ") :])
    assert failure["error"]["type"] == "server_error" and "secret" not in "".join(events)
    assert api.get("/health").status_code == 200


def test_with_a_key_every_route_but_health_needs_it(engine):
    api = TestClient(create_app(engine, api_key="k"))
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/models", "/docs/oauth2-redirect"):
        response = api.get(path)
        assert response.status_code == 401, path
        assert openai_error(response)["type"] == "authentication_error"
        assert api.get(path, headers={"Authorization": "Bearer k"}).status_code in (200, 404), path
    assert api.get("/health").status_code == 200


def test_an_empty_key_is_refused(engine):
    with pytest.raises(ValueError, match="empty"):
        create_app(engine, api_key="")


def test_host_allow_list_refuses_other_names(engine):
    api = TestClient(create_app(engine, allowed_hosts=allowed_hosts("127.0.0.1", None)))
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
        response = api.get("/v1/models", headers={"Host": host})
        assert response.status_code == 421, host
        assert openai_error(response)["param"] == "Host"
    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000"):
        assert api.get("/v1/models", headers={"Host": host}).status_code == 200, host


def test_host_name_drops_the_port():
    assert host_name("[::1]:8000") == "::1"
    assert host_name("localhost:80") == "localhost"
    assert host_name("example.com") == "example.com"
    assert host_name("::1") == "::1"


def test_allowed_hosts_only_for_a_keyless_loopback_server():
    assert "localhost" in allowed_hosts("127.0.0.1", None)
    assert allowed_hosts("127.0.0.1", "key") is None
    assert allowed_hosts("0.0.0.0", None) is None


def test_api_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("GLMTUNE_API_KEY", raising=False)
    assert read_api_key(None, None) is None
    assert read_api_key("k1", None) == "k1"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert read_api_key(None, str(key_file)) == "from-file"
    monkeypatch.setenv("GLMTUNE_API_KEY", "from-env")
    assert read_api_key(None, None) == "from-env"
    with pytest.raises(ConfigError, match="both"):
        read_api_key("k1", str(key_file))
    key_file.write_text("\n")
    with pytest.raises(ConfigError, match=f"--api_key_file {key_file}: the API key is empty"):
        read_api_key(None, str(key_file))
    with pytest.raises(ConfigError, match="--api_key: the API key is empty"):
        read_api_key("", None)
    monkeypatch.setenv("GLMTUNE_API_KEY", "")
    with pytest.raises(ConfigError, match=r"\$GLMTUNE_API_KEY: the API key is empty"):
        read_api_key(None, None)
    with pytest.raises(ConfigError, match="cannot read"):
        read_api_key(None, str(tmp_path / "missing"))


def test_non_loopback_without_a_key_needs_no_auth():
    with pytest.raises(ConfigError, match="--no_auth"):
        check_auth("0.0.0.0", None, no_auth=False)
    check_auth("0.0.0.0", None, no_auth=True)
    check_auth("0.0.0.0", "key", no_auth=False)
    check_auth("127.0.0.1", None, no_auth=False)
    with pytest.raises(ConfigError, match="contradict"):
        check_auth("127.0.0.1", "key", no_auth=True)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--host", "0.0.0.0"], "without an API key"),
        (["--api_key", ""], "--api_key: the API key is empty"),
        (["--max_queue", "0"], "must be positive"),
        (["--max_batch_size", "0"], "must be positive"),
        (
            ["--ui", "--generation.num_beams", "2"],
            "--ui streams its answers, which needs generation.num_beams 1",
        ),
    ],
)
def test_infer_api_refuses_unsafe_settings_before_loading(argv, expected, capsys, monkeypatch):
    monkeypatch.delenv("GLMTUNE_API_KEY", raising=False)
    assert main("test", argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err


def test_each_limit_flag_sets_its_limit():
    argv = ["--max_queue", "5", "--max_batch_size", "3", "--max_body_bytes", "1000", "--body_timeout", "7"]
    _, ns = parse_args(api_parser("test"), argv)
    assert serving_limits(ns) == ServingLimits(
        max_queue=5, max_batch_size=3, max_body_bytes=1000, body_timeout_s=7.0
    )
    _, defaults = parse_args(api_parser("test"), [])
    assert serving_limits(defaults) == ServingLimits()
