"""Tool-call fine-tuning data (ChatGLM3's `tools` + `conversations`, GLM-4's `messages` with tools and
observations): read with FILE:LINE errors, rendered as the published chat formats do (ChatGLM3: the published
tokenizer's tool-call prompts in tool_chat_golden.json; GLM-4: the published chat_template), and only the
assistant's messages supervised; through data_utils.py."""

import importlib.util
import json
from pathlib import Path

import pytest

from glmtune.data.readers import DataError, read_dialogues
from glmtune.data.samples import IGNORE_INDEX, build_samples
from glmtune.tokenizers.chatglm2 import ChatGLM3Tokenizer
from glmtune.tokenizers.glm4 import GLM4Tokenizer
from glmtune.tokenizers.template_choice import get_template

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data" / "samples"


@pytest.fixture(scope="module")
def golden(reference_dir):
    return json.loads((reference_dir / "chatglm3-6b-tiny" / "tool_chat_golden.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def tok3(reference_dir):
    return ChatGLM3Tokenizer.from_pretrained(str(reference_dir / "chatglm3-6b-tiny"))


@pytest.fixture(scope="module")
def glm4_folder(reference_dir):
    return reference_dir / "glm-4-9b-chat-tiny"


@pytest.fixture(scope="module")
def tok4(glm4_folder):
    return GLM4Tokenizer.from_pretrained(str(glm4_folder))


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def one_sample(path: Path, template) -> tuple[list[int], list[int]]:
    (dialogue,) = read_dialogues(path)
    (sample,) = build_samples(dialogue, template)
    return sample


# ---------------------------------------------------------------- ChatGLM3


def test_chatglm3_sample_is_the_published_tool_prompt_and_learns_only_the_assistant(tok3, golden, tmp_path):
    system, user, call, observation = golden["history"]
    assert (
        system["content"]
        == "Answer the following questions as best as you can. You have access to the following tools:"
    )
    record = {
        "tools": golden["tools"],  # the demo's `tools`: becomes the published system message
        "conversations": [user, call, observation, {"role": "assistant", "content": "股价是 12412。"}],
    }
    ids, labels = one_sample(write_records(tmp_path / "t.jsonl", [record]), get_template("chatglm3", tok3))
    user_ids, obs_ids = golden["user_prompt_ids"], golden["observation_prompt_ids"]
    assert ids[: len(obs_ids)] == obs_ids
    answer = tok3.encode("\n", add_special_tokens=False) + tok3.encode(
        "股价是 12412。", add_special_tokens=False
    )
    assert ids == obs_ids + answer + [tok3.eos_token_id]
    # learnt: the call after its <|assistant|> up to the <|observation|> that ends it, and the answer + eos
    call_end = obs_ids.index(tok3.get_command("<|observation|>"), len(user_ids)) + 1
    expected = [IGNORE_INDEX] * len(user_ids) + obs_ids[len(user_ids) : call_end]
    expected += [IGNORE_INDEX] * (len(obs_ids) - call_end) + answer + [tok3.eos_token_id]
    assert labels == expected


def test_chatglm3_tool_message_is_formatted_as_the_finetune_demo_does():
    (dialogue, _) = read_dialogues(SAMPLES / "tools_chatglm3.jsonl")
    system, user, call, observation, answer = dialogue.meta["messages"]
    assert system["role"] == "system" and system["tools"][0]["name"] == "track"
    assert call == {
        "role": "assistant",
        "metadata": "track",
        "content": "```python\ntool_call(symbol='10111')\n```",
    }
    assert observation == {"role": "observation", "content": '{"price": 12412}'}  # JSON, not Python repr
    # turns (for reports and --predict): each assistant message after the message it answers
    assert dialogue.turns == [
        (user["content"], call["content"]),
        (observation["content"], answer["content"]),
    ]


# ---------------------------------------------------------------- GLM-4


def published_render(tok4, glm4_folder, messages) -> list[int]:
    """The published chat_template (tokenizer_config.json) rendered by jinja, then the demo's `<|user|>`."""
    template = json.loads((glm4_folder / "tokenizer_config.json").read_text("utf-8"))["chat_template"]
    ids = tok4.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False)
    return list(ids) + [tok4.get_command("<|user|>")]


@pytest.mark.parametrize("name, learn_newline", [("glm4", False), ("glm4_per_message", True)])
def test_glm4_sample_is_the_published_chat_template(tok4, glm4_folder, name, learn_newline):
    for dialogue in read_dialogues(SAMPLES / "tools_glm4.jsonl"):
        messages = dialogue.meta["messages"]
        assert any(m.get("tools") for m in messages) and any(m["role"] == "observation" for m in messages)
        ids, labels = build_samples(dialogue, get_template(name, tok4))[0]
        assert ids == published_render(tok4, glm4_folder, messages)
        learnt = tok4.decode([t for t in labels if t != IGNORE_INDEX])
        call = next(m for m in messages if m.get("metadata"))
        final = messages[-1]["content"]
        newline = "\n" if learn_newline else ""
        assert learnt == f"{call['metadata']}\n{call['content']}<|observation|>{newline}{final}<|user|>"


# ---------------------------------------------------------------- errors and the script

BAD = [
    (
        {
            "conversations": [
                {"role": "user", "content": "q"},
                {"role": "tool", "parameters": {}, "observation": 1},
            ]
        },
        "conversations[1].name",
        "missing",
    ),
    (
        {"tools": [], "conversations": [{"role": "robot", "content": "q"}]},
        "conversations[0].role",
        "unknown role",
    ),
    (
        {"messages": [{"role": "user", "content": "q", "tools": []}, {"role": "assistant", "content": "a"}]},
        "messages[0].tools",
        "system message",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "observation", "content": "o"}]},
        "messages",
        "last message must be an assistant",
    ),
]


@pytest.mark.parametrize("record, field, message", BAD)
def test_bad_tool_record_names_file_line_and_field(tmp_path, record, field, message):
    good = json.loads((SAMPLES / "tools_glm4.jsonl").read_text("utf-8").splitlines()[0])
    path = write_records(tmp_path / "t.jsonl", [good, record])
    with pytest.raises(DataError) as e:
        read_dialogues(path)
    assert e.value.source == f"{path}:2" and e.value.field == field and message in str(e.value)


@pytest.fixture(scope="module")
def data_utils():
    spec = importlib.util.spec_from_file_location("data_utils", REPO / "data_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_data_utils(data_utils, reference_dir, folder: str, data: Path, out: Path) -> int:
    return data_utils.main(
        [
            "--model.path", str(reference_dir / folder),
            "--data.train_files", json.dumps([str(data)]),
            "--data.eval_files", "[]",
            "--data.max_seq_length", "512",
            "--data.output_dir", str(out),
        ]
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "folder, data", [("chatglm3-6b-tiny", "tools_chatglm3"), ("glm-4-9b-chat-tiny", "tools_glm4")]
)
def test_data_utils_builds_tool_records(data_utils, reference_dir, tmp_path, capsys, folder, data):
    assert run_data_utils(data_utils, reference_dir, folder, SAMPLES / f"{data}.jsonl", tmp_path / "r") == 0
    out = capsys.readouterr().out + capsys.readouterr().err
    assert "2 train" in out and "truncated" not in out.replace("0 truncated", "")


def test_data_utils_refuses_tool_data_for_a_template_without_tools(
    data_utils, reference_dir, tmp_path, capsys
):
    data = SAMPLES / "tools_glm4.jsonl"
    assert run_data_utils(data_utils, reference_dir, "chatglm2-6b-tiny", data, tmp_path / "r") == 1
    err = capsys.readouterr().err
    assert f"error: {data}:1: tool-call data needs a ChatGLM3 or GLM-4 template" in err


def test_chatglm3_tools_are_refused_for_glm4_rather_than_dropped(tok4, tmp_path):
    path = write_records(
        tmp_path / "t.jsonl",
        [json.loads((SAMPLES / "tools_chatglm3.jsonl").read_text("utf-8").splitlines()[0])],
    )
    (dialogue,) = read_dialogues(path)
    with pytest.raises(DataError, match='GLM-4 tools need a "type"') as e:
        build_samples(dialogue, get_template("glm4", tok4))
    assert e.value.source == f"{path}:1"
