"""Batch prediction (--predict) and its ROUGE / BLEU scores, checked against the libraries themselves."""

from __future__ import annotations

import dataclasses
import json

import jieba
import pytest
import sacrebleu
from rouge_chinese import Rouge

from glmtune.config import GenerationArgs
from glmtune.inference import predict
from glmtune.metrics import bleu4, rouge_scores, text_metrics
from tests.inference.conftest import REPO, run_script

PAIRS = [
    ("每天早上九点开门。", "每天早上九点开门。"),
    ("八十度左右的水最合适。", "绿茶用八十度的水冲泡最合适，不要用开水。"),
    ("比喻多此一举。", "比喻多此一举，反而坏事。"),
    ("招牌是桂花乌龙。", "今天不营业。"),
    ("The tea house opens at 9 am.", "It opens at nine in the morning."),
    ("", "一壶四十五元。"),
]


def library_rouge(predictions, references) -> dict[str, float]:
    """ROUGE F1 averaged over pairs, straight from jieba + rouge-chinese; 0 for a pair with an empty side."""
    rouge, totals = Rouge(), {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        hyp, ref = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
        if hyp.split() and ref.split():
            scores = rouge.get_scores(hyp, ref)[0]
            for key in totals:
                totals[key] += scores[key]["f"]
    return {key: 100 * value / len(predictions) for key, value in totals.items()}


def test_metrics_equal_the_libraries_on_the_same_strings():
    predictions, references = zip(*PAIRS, strict=True)
    ours = text_metrics(list(predictions), list(references))
    expected_rouge = library_rouge(predictions, references)
    for key in ("rouge-1", "rouge-2", "rouge-l"):
        assert ours[key] == pytest.approx(expected_rouge[key], abs=1e-9)
    expected_bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize="zh").score
    assert ours["bleu-4"] == pytest.approx(expected_bleu, abs=1e-9)
    # Partly overlapping Chinese text scores strictly between 0 and 100: the text was split into words.
    assert 0 < ours["rouge-1"] < 100 and 0 < ours["bleu-4"] < 100


def test_identical_texts_score_100_and_unrelated_texts_0():
    texts = ["每天早上九点开门。", "比喻多此一举，反而坏事。"]
    assert rouge_scores(texts, texts) == pytest.approx({"rouge-1": 100, "rouge-2": 100, "rouge-l": 100})
    assert bleu4(texts, texts) == pytest.approx(100)
    assert rouge_scores(["今天不营业。"], ["绿茶很香"])["rouge-1"] == 0


def test_metrics_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        text_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        text_metrics([], [])


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
    expected = library_rouge(predictions, references)
    expected["bleu-4"] = sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score
    saved = json.loads((tmp_path / "pred.metrics.json").read_text())
    for key, value in expected.items():
        assert saved[key] == pytest.approx(value, abs=1e-9)
        assert summary[key] == pytest.approx(value, abs=1e-9)
        assert f"{key}: {value:.2f}" in "\n".join(printed)
    exact = sum(p == r for p, r in zip(predictions, references, strict=True))
    assert exact == 1 and saved["exact_match"] == pytest.approx(exact / 4)
    assert printed[-1] == f"exact match: {exact}/4"


@pytest.mark.slow
@pytest.mark.parametrize(
    "sample", ["alpaca.json", "conversations.jsonl", "input_target.jsonl", "prompt_completion.jsonl"]
)
def test_predict_reads_every_data_format_with_history_and_system(base_engine, sample, tmp_path, capsys):
    from glmtune.inference import prediction_items

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
    assert saved["rouge-1"] == pytest.approx(library_rouge(predictions, references)["rouge-1"], abs=1e-9)
    exact = sum(p == r for p, r in zip(predictions, references, strict=True))
    assert proc.stdout.strip().splitlines()[-1] == f"exact match: {exact}/2"
