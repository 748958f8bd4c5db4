"""Preference pairs whose prompt is a dialogue so far: ShareGPT `conversations` or OpenAI `messages` ending
with the user's message, plus `chosen` / `rejected`; their FILE:LINE errors."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from glmtune.data.preference import iter_pairs
from glmtune.data.readers import DataError
from tests.conftest import REPO_ROOT

SAMPLE = REPO_ROOT / "data" / "samples" / "preference_conversations.jsonl"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_the_sample_dialogues_give_history_system_and_both_answers():
    sharegpt, openai, single = iter_pairs(SAMPLE)
    assert sharegpt.query == "多少钱一壶？"
    assert sharegpt.history == [("今天有新茶吗？", "有，刚到了明前龙井。")]
    assert sharegpt.system == "你是山间茶舍的店员，回答要简短。"
    assert (sharegpt.chosen, sharegpt.rejected) == ("一壶四十五元。", "店主是林秋云阿姨。")
    assert (openai.query, openai.history, openai.system) == (
        "晚上几点打烊？",
        [("山间茶舍几点开门？", "每天早上九点开门。")],
        None,
    )
    assert (single.history, single.system) == ([], "你熟悉中国的成语故事。")
    assert single.source == f"{SAMPLE}:3"


def test_the_three_dialogue_forms_are_the_same_pair(tmp_path):
    turns = [("你好", "你好！"), ("几点开门？", None)]
    system = {"role": "system", "content": "简短回答。"}
    messages = [system] + [
        {"role": role, "content": text}
        for q, a in turns
        for role, text in (("user", q), ("assistant", a))
        if text is not None
    ]
    sharegpt = [
        {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
        for m in messages
    ]
    answers = {"chosen": "九点。", "rejected": "不知道。"}
    records = [
        {"prompt": messages, **answers},
        {"messages": messages, **answers},
        {"conversations": sharegpt, **answers},
    ]
    pairs = [replace(p, source="") for p in iter_pairs(write_jsonl(tmp_path / "pairs.jsonl", records))]
    assert pairs[0] == pairs[1] == pairs[2]
    assert (pairs[0].query, pairs[0].history, pairs[0].system) == (
        "几点开门？",
        [("你好", "你好！")],
        "简短回答。",
    )
    # A top-level `system` is the default a system message overrides.
    [with_default] = iter_pairs(
        write_jsonl(tmp_path / "d.jsonl", [{"messages": messages[1:], "system": "S", **answers}])
    )
    assert with_default.system == "S"


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "conversations", "the prompt's last message must be the user's"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "messages[1].role", "unexpected role 'bot'"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "messages[0].role", "unexpected role 'assistant'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]}, "messages[1].role", "unexpected role 'system'"),
        ({"conversations": [{"from": "human", "text": "q"}]}, "conversations[0]", 'expected a {"from", "value"} message'),
        ({"conversations": [{"from": "human", "value": 3}]}, "conversations[0].value", "expected str, got int"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}, {"role": "user", "content": "r"}]}, "messages[1].content", "empty answer"),
        ({"messages": []}, "messages", "empty list"),
        ({"messages": "q"}, "messages", "expected list"),
    ],
)  # fmt: skip
def test_a_bad_dialogue_pair_names_file_line_and_field(tmp_path, record, field, message):
    good = {"messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, {**record, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError) as err:
        list(iter_pairs(path))
    assert err.value.source == f"{path}:2"
    assert err.value.field == field
    assert message in str(err.value)


def test_a_dialogue_pair_still_needs_both_answers(tmp_path):
    record = {"conversations": [{"from": "human", "value": "q"}], "chosen": "a"}
    with pytest.raises(DataError) as err:
        list(iter_pairs(write_jsonl(tmp_path / "pairs.jsonl", [record])))
    assert (err.value.field, err.value.source) == ("rejected", f"{tmp_path / 'pairs.jsonl'}:1")
