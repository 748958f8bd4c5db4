"""The serving pieces without a server: token budgets, OpenAI messages, stream deltas, model kinds, UI history."""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("fastapi", reason="serving needs the 'serve' extras")

from glmtune.config import ConfigError  # noqa: E402
from glmtune.serving.api import DeltaTracker, conversation, sampling  # noqa: E402
from glmtune.serving.launch import default_model_name, detect_model_kind  # noqa: E402
from glmtune.serving.limits import RequestError, answer_budget  # noqa: E402
from glmtune.serving.schemas import ChatMessage  # noqa: E402
from glmtune.serving.web import history_pairs  # noqa: E402

# --- token budget ---------------------------------------------------------------------------------------------


def test_explicit_max_tokens_must_fit_the_context():
    assert answer_budget(100, 2048, 48, max_new_tokens=1948) == 1948
    with pytest.raises(
        RequestError, match=r"maximum context length is 2048 tokens, but 2049 were requested"
    ) as err:
        answer_budget(100, 2048, 48, max_new_tokens=1949)
    assert err.value.status == 400


def test_default_budget_shrinks_to_what_is_left():
    assert answer_budget(100, 2048, 48) == 48
    assert answer_budget(2040, 2048, 48) == 8
    with pytest.raises(RequestError, match="the prompt is 2048 tokens"):
        answer_budget(2048, 2048, 48)
    assert answer_budget(10**6, None, 48) == 48  # no known context: nothing to check


def test_max_length_is_prompt_plus_answer():
    assert answer_budget(30, 2048, 48, max_length=100) == 70
    with pytest.raises(RequestError, match="no room for an answer"):
        answer_budget(100, 2048, 48, max_length=100)
    with pytest.raises(RequestError, match="exceeds this model's context length of 2048"):
        answer_budget(10, 2048, 48, max_length=4096)


# --- OpenAI messages ------------------------------------------------------------------------------------------


def messages(*pairs: tuple[str, object]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in pairs]


def test_conversation_splits_system_history_and_query():
    query, history, system = conversation(
        messages(
            ("system", "be kind"),
            ("developer", "be brief"),
            ("user", "q1"),
            ("assistant", "a1"),
            ("user", [{"type": "text", "text": "q"}, {"type": "text", "text": "2"}]),
        )
    )
    assert (query, history, system) == ("q2", [("q1", "a1")], "be kind\nbe brief")
    assert conversation(messages(("user", "hi"))) == ("hi", [], None)


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("system", "s")], "no user message"),
        ([("assistant", "a"), ("user", "q")], "messages.0: expected a 'user' message, got 'assistant'"),
        (
            [("user", "q"), ("system", "s"), ("user", "q")],
            "messages.1: expected a 'assistant' message, got 'system'",
        ),
        ([("user", "q"), ("assistant", "a")], "the last message must come from the user"),
    ],
)
def test_conversation_refuses_misordered_messages(pairs, expected):
    with pytest.raises(RequestError, match=expected):
        conversation(messages(*pairs))


def test_sampling_temperature_zero_is_greedy():
    assert sampling(None, None) == {}
    assert sampling(0, None) == {"do_sample": False}
    assert sampling(0.7, 0.9) == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}


# --- stream deltas --------------------------------------------------------------------------------------------


def test_deltas_hold_back_a_possible_stop_string_and_trailing_space():
    tracker = DeltaTracker(["END"])
    sent = [
        tracker.update(shown) for shown in [" ", " Hel", " Hello ", " Hello E", " Hello EN", " Hello world"]
    ]
    # " Hello E" / " Hello EN" may be the start of "END": nothing after "Hello" leaves before it is settled.
    assert sent == ["", "Hel", "lo", "", "", " world"]
    assert tracker.finish("Hello world!") == "!"


def test_deltas_add_up_to_an_answer_cut_at_a_stop_string():
    tracker = DeltaTracker(["。"])
    pieces = [tracker.update(s) for s in ["你好", "你好，", "你好，世界"]]
    # stream_chat cuts at the stop string itself: it shows "你好，世界" and the answer is that, stripped.
    assert "".join(pieces) + tracker.finish("你好，世界") == "你好，世界"


# --- model kinds ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("lora", "lora"),
        ("adalora", "lora"),
        ("ia3", "lora"),
        ("full", "finetuned"),
        ("freeze", "finetuned"),
        ("ptv2", "finetuned"),
    ],
)
def test_model_kind_comes_from_the_artifact_method(tmp_path, method, kind):
    (tmp_path / "hyperparameters.yaml").write_text(yaml.safe_dump({"method": method}))
    assert detect_model_kind(tmp_path) == kind
    assert detect_model_kind(None) == "base"


def test_model_kind_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no hyperparameters.yaml"):
        detect_model_kind(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="--model.path"):
        detect_model_kind(tmp_path)
    (tmp_path / "hyperparameters.yaml").write_text(yaml.safe_dump({"method": "magic"}))
    with pytest.raises(ConfigError, match=r"hyperparameters.yaml: method 'magic'"):
        detect_model_kind(tmp_path)


def test_default_model_name(tmp_path):
    from glmtune.config import TaskConfig

    cfg = TaskConfig()
    assert default_model_name(cfg, None) == "tiny-chatglm2"
    assert default_model_name(cfg, str(tmp_path / "run7" / "final")) == "tiny-chatglm2+run7"


# --- web chat history -----------------------------------------------------------------------------------------


def test_gradio_history_becomes_pairs():
    history = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": [{"type": "text", "text": "a1"}]},
        {"role": "user", "content": [{"type": "text", "text": "q2"}]},  # its answer failed: dropped
        {"role": "user", "content": "q3"},
        {"role": "assistant", "content": "a3"},
    ]
    assert history_pairs(history) == [("q1", "a1"), ("q3", "a3")]
