"""Preference pairs: the formats, their FILE:LINE errors, the template's rendering and the length handling."""

import json
from pathlib import Path

import pytest

from glmtune.data.preference import (
    CHOSEN,
    PROMPT,
    REJECTED,
    PairCollator,
    fit_pair,
    iter_pairs,
    pair_record,
)
from glmtune.data.readers import DataError
from glmtune.data.samples import IGNORE_INDEX
from glmtune.data.settings import LengthSettings
from tests.conftest import REPO_ROOT


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_prompt_chosen_rejected_and_alpaca_pairs():
    [first, *_] = iter_pairs(REPO_ROOT / "data" / "samples" / "preference_train.jsonl")
    assert (first.query, first.history) == ("山间茶舍几点开门？", [])
    assert first.chosen == "每天早上九点开门。" and first.rejected != first.chosen
    plain, with_history = iter_pairs(REPO_ROOT / "data" / "samples" / "preference_alpaca.json")
    assert plain.query == "介绍山间茶舍的招牌茶。"
    assert with_history.query == "把下面的句子翻译成英文。\n茶舍晚上八点半打烊。"
    assert with_history.history == [("你好", "你好！有什么可以帮你？")]
    assert with_history.source.endswith("preference_alpaca.json:8")


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        ({"prompt": "q", "chosen": "a"}, "rejected", "missing"),
        ({"prompt": "q", "chosen": "a", "rejected": 3}, "rejected", "expected a string"),
        ({"prompt": "q", "chosen": " ", "rejected": "b"}, "chosen", "empty answer"),
        ({"chosen": "a", "rejected": "b"}, "prompt", "missing"),
        ({"prompt": 1, "chosen": "a", "rejected": "b"}, "prompt", "expected str"),
        ({"instruction": "q", "history": [["x"]], "chosen": "a", "rejected": "b"}, "history[0]", "pair"),
    ],
)
def test_a_bad_pair_names_file_line_and_field(tmp_path, record, field, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError) as err:
        list(iter_pairs(path))
    assert err.value.source == f"{path}:2"
    assert err.value.field == field
    assert message in str(err.value)


def test_invalid_json_names_its_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path.name}:2: invalid JSON"):
        list(iter_pairs(path))


def test_a_long_pair_loses_prompt_tokens_first_and_keeps_both_answers():
    s = LengthSettings(max_seq_length=10, protected_head=2, protected_tail=1)
    prompt, chosen, rejected = list(range(100, 108)), [1, 2, 3, 9], [4, 5, 9]
    p, c, r = fit_pair(prompt, chosen, rejected, s)
    assert (c, r) == (chosen, rejected)
    assert p == [100, 101, 104, 105, 106, 107]  # the oldest unprotected context went; head and tail kept
    tail_side = LengthSettings(
        max_seq_length=10, protected_head=2, protected_tail=1, truncate_side="prompt_tail"
    )
    assert fit_pair(prompt, chosen, rejected, tail_side)[0] == [100, 101, 102, 103, 104, 107]
    # When the prompt's protected tokens alone leave too little room, the answers are cut, keeping their end.
    p, c, r = fit_pair(prompt, [1, 2, 3, 4, 5, 6, 7, 8, 9], rejected, s)
    assert len(p) == 3 and c == [1, 2, 3, 4, 5, 6, 9] and r == rejected


def test_the_collator_unfolds_pairs_into_chosen_then_rejected_rows():
    import torch

    items = [
        {k: torch.from_numpy(v) for k, v in pair_record([7, 8], [1, 2, 3], [4]).items()},
        {k: torch.from_numpy(v) for k, v in pair_record([9], [5], [6, 6]).items()},
    ]
    assert items[0]["part"].tolist() == [PROMPT, PROMPT, CHOSEN, CHOSEN, CHOSEN, REJECTED]
    batch = PairCollator(pad_token_id=0)(items)
    assert batch["input_ids"].tolist() == [[7, 8, 1, 2, 3], [9, 5, 0, 0, 0], [7, 8, 4, 0, 0], [9, 6, 6, 0, 0]]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 1, 2, 3]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]


def test_trl_conversational_pairs(tmp_path):
    record = {
        "prompt": [
            {"role": "system", "content": "简短回答。"},
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！"},
            {"role": "user", "content": "几点开门？"},
        ],
        "chosen": [{"role": "assistant", "content": "九点。"}],
        "rejected": [{"role": "assistant", "content": "不知道。"}],
    }
    [pair] = iter_pairs(write_jsonl(tmp_path / "pairs.jsonl", [record]))
    assert (pair.query, pair.history, pair.system) == ("几点开门？", [("你好", "你好！")], "简短回答。")
    assert (pair.chosen, pair.rejected) == ("九点。", "不知道。")
    record["prompt"] = record["prompt"][:3]
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'prompt': the prompt's last message must be"):
        list(iter_pairs(write_jsonl(tmp_path / "pairs.jsonl", [record])))


def test_pairs_render_the_chat_prompt_of_the_template():
    from glmtune.data.preference import PreferencePair, pair_sample

    class Template:
        def build_train_sample(self, query, response, history=None, system=None):
            prompt = [1, *map(ord, query), 2]
            return prompt + [*map(ord, response), 3], [-100] * len(prompt) + [*map(ord, response), 3]

    pair = PreferencePair("q", "yes", "no", [], None, "f:1")
    assert pair_sample(pair, Template()) == ([1, ord("q"), 2], [*map(ord, "yes"), 3], [*map(ord, "no"), 3])
