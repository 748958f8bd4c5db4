"""A client's sampling settings, and the server's generation config, reach the model's generate() call."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extras")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from glmtune.config import GenerationArgs  # noqa: E402
from glmtune.serving.api import create_app  # noqa: E402

QUERY = "山间茶舍几点开门？"
# What generate() gets besides the tensors and the streaming plumbing: the settings under test.
PLUMBING = {"input_ids", "attention_mask", "streamer", "stopping_criteria", "eos_token_id", "pad_token_id"}


@pytest.fixture
def generate_calls(engine, monkeypatch) -> list[dict]:
    """Every generate() call's settings, in order; the real generate still answers."""
    calls: list[dict] = []
    real = engine.model.generate

    def recording_generate(*args, **kwargs):
        calls.append({k: v for k, v in kwargs.items() if k not in PLUMBING})
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", recording_generate)
    return calls


def chat(client: TestClient, stream: bool = False, **settings) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUERY}], "stream": stream, **settings}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_openai_sampling_settings_reach_generate(engine, generate_calls, stream):
    client = TestClient(create_app(engine, model_name="tiny"))
    chat(client, stream, temperature=0.7, top_p=0.8, max_tokens=5)
    assert generate_calls[-1] == {
        "max_new_tokens": 5,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": engine.generation.top_k,  # not an OpenAI field: the server's generation.top_k
        "num_beams": 1,
        "repetition_penalty": 1.0,
    }
    chat(client, stream, temperature=0, top_p=0.5, max_tokens=3)  # temperature 0 is greedy
    assert generate_calls[-1] == {
        "max_new_tokens": 3,
        "do_sample": False,
        "num_beams": 1,
        "repetition_penalty": 1.0,
    }
    assert len(generate_calls) == 2


def test_unset_settings_keep_the_servers_generation_config(engine, generate_calls):
    served = dataclasses.replace(
        engine,
        generation=GenerationArgs(
            max_new_tokens=6, do_sample=True, temperature=0.3, top_p=0.6, top_k=7, repetition_penalty=1.2
        ),
    )
    chat(TestClient(create_app(served, model_name="tiny")))
    assert generate_calls == [
        {
            "max_new_tokens": 6,
            "do_sample": True,
            "temperature": 0.3,
            "top_p": 0.6,
            "top_k": 7,
            "num_beams": 1,
            "repetition_penalty": 1.2,
        }
    ]


def test_chatglm_post_sampling_settings_reach_generate(engine, generate_calls):
    client = TestClient(create_app(engine, model_name="tiny"))
    prompt_tokens = len(engine.prompt_ids(QUERY))
    body = {"prompt": QUERY, "history": [], "temperature": 0.9, "top_p": 0.4, "max_length": prompt_tokens + 4}
    response = client.post("/", json=body)
    assert response.status_code == 200, response.text
    assert generate_calls[-1]["max_new_tokens"] == 4  # max_length counts the prompt too
    assert generate_calls[-1]["do_sample"] is True
    assert (generate_calls[-1]["temperature"], generate_calls[-1]["top_p"]) == (0.9, 0.4)
