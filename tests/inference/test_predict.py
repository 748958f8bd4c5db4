"""Batch prediction (--predict) and its ROUGE / BLEU scores, checked against the published computation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from glmtune.config import GenerationArgs
from glmtune.inference.predict import predict
from tests.inference.conftest import REPO, run_script
from tests.inference.test_metrics import published_scores


def short_answers(engine, tokens: int = 12):
    """The same model answering in at most `tokens` tokens (keeps the tests quick)."""
    return dataclasses.replace(engine, generation=GenerationArgs(max_new_tokens=tokens))


def write_items(path, pairs):
    path.write_text(
        "".join(json.dumps({"prompt": q, "completion": a}, ensure_ascii=False) + "\n" for q, a in pairs)
    )
    return path


@pytest.mark.slow
def test_predict_scores_what_it_saved_and_ends_with_exact_match(base_engine, tmp_path, capsys):
    queries = [
        "山间茶舍几点开门？",
        "绿茶用多少度的水冲泡？",
        "「画蛇添足」是什么意思？",
        "茶舍最受欢迎的茶是哪款？",
    ]
    engine = short_answers(base_engine, 16)
    own = [engine.chat(q)[0] for q in queries]
    # References the model partly matches: its own answer, a prefix of it, a longer text, something else.
    references = [own[0], own[1][: len(own[1]) // 2], own[2] + "，也就是多余。", "今天不营业。"]
    data = write_items(tmp_path / "items.jsonl", zip(queries, references, strict=True))

    summary = predict(engine, data, out=tmp_path / "pred.jsonl", batch_size=3)
    printed = capsys.readouterr().out.strip().splitlines()

    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == own  # batched (left-padded) answers equal one-by-one answers
    assert [r["reference"] for r in rows] == references
    predictions = [r["prediction"] for r in rows]
    expected = published_scores(predictions, references)
    saved = json.loads((tmp_path / "pred.metrics.json").read_text())
    for key, value in expected.items():
        assert saved[key] == pytest.approx(value, abs=1e-4)
        assert summary[key] == pytest.approx(value, abs=1e-4)
        assert f"{key}: {value:.2f}" in "\n".join(printed)
    exact = sum(p == r for p, r in zip(predictions, references, strict=True))
    assert exact == 1 and saved["exact_match"] == pytest.approx(exact / 4)
    assert printed[-1] == f"exact match: {exact}/4"


@pytest.mark.slow
@pytest.mark.parametrize(
    "sample", ["alpaca.json", "conversations.jsonl", "input_target.jsonl", "prompt_completion.jsonl"]
)
def test_predict_reads_every_data_format_with_history_and_system(base_engine, sample, tmp_path, capsys):
    from glmtune.inference.predict import prediction_items

    engine = short_answers(base_engine)
    file = REPO / "data" / "samples" / sample
    items = list(prediction_items(file))[:3]
    summary = predict(engine, file, limit=3, batch_size=3, out=tmp_path / "pred.jsonl")
    assert summary["samples"] == len(items)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("exact match: ")
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    one_by_one = [engine.chat(i["query"], i["history"], i["system"])[0] for i in items]
    assert [r["prediction"] for r in rows] == one_by_one


def test_predict_names_an_empty_selection(base_engine, tmp_path):
    data = write_items(tmp_path / "items.jsonl", [("你好", "你好")])
    with pytest.raises(ValueError, match="no dialogue turns"):
        predict(base_engine, data, limit=0)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["infer.py", "infer_lora_finetuning.py"])
def test_predict_from_the_command_line(script, tiny_model, lora_adapter, tmp_path):
    data = write_items(
        tmp_path / "items.jsonl", [("山间茶舍几点开门？", "每天早上九点开门。"), ("你好", "你好！")]
    )
    target = (
        ["--model.path", str(tiny_model)] if script == "infer.py" else ["--checkpoint", str(lora_adapter)]
    )
    out = tmp_path / "pred.jsonl"
    proc = run_script(
        script, *target, "--predict", str(data), "--out", str(out), "--batch_size", "2",
        "--generation.max_new_tokens", "16",
    )  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    saved = json.loads(out.with_suffix(".metrics.json").read_text())
    predictions, references = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    assert saved["rouge-1"] == pytest.approx(published_scores(predictions, references)["rouge-1"], abs=1e-4)
    exact = sum(p == r for p, r in zip(predictions, references, strict=True))
    assert proc.stdout.strip().splitlines()[-1] == f"exact match: {exact}/2"


def test_prediction_items_keep_each_turns_history_and_system(tmp_path):
    from glmtune.inference.predict import prediction_items

    sharegpt = {
        "conversations": [
            {"from": "system", "value": "你是茶舍的店员。"},
            {"from": "human", "value": "今天有新茶吗？"},
            {"from": "gpt", "value": "有，明前龙井。"},
            {"from": "human", "value": "多少钱一壶？"},
            {"from": "gpt", "value": "四十五元。"},
        ]
    }
    alpaca = [
        {
            "instruction": "再来一壶",
            "output": "好的。",
            "history": [["你好", "欢迎！"]],
            "system": "简短回答。",
        }
    ]
    (tmp_path / "chat.jsonl").write_text(json.dumps(sharegpt, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")

    items = [{k: v for k, v in i.items() if k != "source"} for i in prediction_items(tmp_path / "chat.jsonl")]
    assert items == [
        {
            "query": "今天有新茶吗？",
            "history": [],
            "system": "你是茶舍的店员。",
            "reference": "有，明前龙井。",
        },
        {
            "query": "多少钱一壶？",
            "history": [("今天有新茶吗？", "有，明前龙井。")],
            "system": "你是茶舍的店员。",
            "reference": "四十五元。",
        },
    ]
    [*_, last] = prediction_items(tmp_path / "alpaca.json")
    assert (last["query"], last["history"], last["system"]) == (
        "再来一壶",
        [("你好", "欢迎！")],
        "简短回答。",
    )


def test_predict_asks_with_the_history_and_system_of_each_turn(tmp_path):
    """The engine is asked each turn with its own earlier turns and system prompt (a fake engine records it)."""
    from glmtune.inference.engine import Completion
    from glmtune.inference.predict import prediction_items

    file = REPO / "data" / "samples" / "conversations.jsonl"
    asked = []

    class Recorder:
        def prompt_ids(self, query, history, system):
            asked.append((query, history, system))
            return [len(asked)]

        def complete_prompts(self, prompts):
            assert prompts == [[n] for n in range(len(asked) - len(prompts) + 1, len(asked) + 1)]
            return [Completion("", 1, 0, "stop") for _ in prompts]

    predict(Recorder(), file, batch_size=2, show=False)
    expected = [(i["query"], i["history"], i["system"]) for i in prediction_items(file)]
    assert asked == expected and any(h for _, h, _ in asked) and any(s for _, _, s in asked)


@pytest.mark.parametrize(("folder", "tokenizer_class", "data"), [
    ("chatglm3-6b-tiny", "ChatGLM3Tokenizer", "tools_chatglm3.jsonl"),
    ("glm-4-9b-chat-tiny", "GLM4Tokenizer", "tools_glm4.jsonl"),
])  # fmt: skip
def test_predict_on_tool_call_data_asks_with_the_tools_and_compares_calls(
    reference_dir, tmp_path, folder, tokenizer_class, data
):
    """Each assistant message of a tool dialogue (text or call) is asked with the messages before it, tools
    included, and a call is compared as a call. The stand-in model answers as the data says, except for the
    first call, whose arguments it gets wrong."""
    import glmtune.tokenizers as tokenizers
    from glmtune.inference.engine import ChatEngine
    from glmtune.inference.predict import prediction_items
    from glmtune.tokenizers.template_choice import get_template
    from glmtune.tokenizers.tool_prompts import (
        message_ids,
        offered_tool_names,
        parse_tool_call,
        tool_call_message,
    )
    from tests.scripted_model import ScriptedModel

    tokenizer = getattr(tokenizers, tokenizer_class).from_pretrained(str(reference_dir / folder))
    template = get_template("chatglm3" if "chatglm3" in folder else "glm4", tokenizer)
    file = REPO / "data" / "samples" / data
    items = list(prediction_items(file))
    answers = []
    for item in items:
        call = parse_tool_call(tokenizer, item["reference"], offered_tool_names(item["messages"]))
        if call is None:
            answers.append({"role": "assistant", "content": item["reference"]})
        else:
            wrong = not any("metadata" in a for a in answers)  # the first call gets other arguments
            answers.append(tool_call_message(tokenizer, call[0], {"x": 1} if wrong else call[1]))
    assert sum("metadata" in a for a in answers) >= 2, "the data needs calls to compare"
    end = tokenizer.convert_tokens_to_ids("<|user|>")
    model = ScriptedModel([message_ids(tokenizer, m)[1:] + [end] for m in answers])
    summary = predict(ChatEngine(model, tokenizer, template), file, out=tmp_path / "p.jsonl", show=False)
    assert model.prompts == [template.build_messages_prompt(i["messages"]).input_ids for i in items]
    assert summary["samples"] == len(items)
    assert summary["exact_match_count"] == len(items) - 1
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prediction"] == r["reference"] for r in rows].count(False) == 1
