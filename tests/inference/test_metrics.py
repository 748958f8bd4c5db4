"""ROUGE / BLEU as ChatGLM's P-Tuning v2 script computes them, checked against jieba, rouge-chinese and nltk."""

from __future__ import annotations

import json

import jieba
import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from glmtune.inference.metrics import format_metrics, pair_scores, text_metrics

PAIRS = [
    ("每天早上九点开门。", "每天早上九点开门。"),
    ("八十度左右的水最合适。", "绿茶用八十度的水冲泡最合适，不要用开水。"),
    ("比喻多此一举。", "比喻多此一举，反而坏事。"),
    ("招牌是桂花乌龙。", "今天不营业。"),
    ("The tea house opens at 9 am.", "It opens at nine in the morning."),
    ("", "一壶四十五元。"),
    ("一壶四十五元。", "  "),
]


def published_scores(predictions, references) -> dict[str, float]:
    """THUDM ChatGLM-6B ptuning/main.py `compute_metrics`, on decoded texts; a pair with an empty side scores 0
    (where the published loop would crash in rouge-chinese)."""
    score_dict = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(predictions, references, strict=True):
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        if " ".join(hypothesis).split() and " ".join(reference).split():
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
            for k, v in result.items():
                score_dict[k].append(round(v["f"] * 100, 4))
        else:
            for k in ("rouge-1", "rouge-2", "rouge-l"):
                score_dict[k].append(0.0)
        bleu_score = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        score_dict["bleu-4"].append(round(bleu_score * 100, 4))
    return {k: float(np.mean(v)) for k, v in score_dict.items()}


def test_metrics_equal_the_published_computation_on_the_same_strings():
    predictions, references = (list(side) for side in zip(*PAIRS, strict=True))
    ours = text_metrics(predictions, references)
    expected = published_scores(predictions, references)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-4)  # ours is rounded to 4 decimals once more
    # Partly overlapping Chinese text scores strictly between 0 and 100: the text was split into words.
    assert 0 < ours["rouge-1"] < 100 and 0 < ours["bleu-4"] < 100


@pytest.mark.parametrize("prediction, reference", PAIRS[1:5])
def test_one_pair_equals_the_libraries(prediction, reference):
    ours = pair_scores(prediction, reference)
    rouge = Rouge().get_scores(" ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference)))[0]
    for key in ("rouge-1", "rouge-2", "rouge-l"):
        assert ours[key] == pytest.approx(100 * rouge[key]["f"], abs=1e-4)
    # BLEU on characters, not on words or bytes: sentence_bleu of the character lists.
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    assert ours["bleu-4"] == pytest.approx(100 * bleu, abs=1e-4)


def test_the_mean_over_samples_not_a_corpus_score():
    predictions, references = ["比喻多此一举。", "八十度左右的水最合适。"], [PAIRS[2][1], PAIRS[1][1]]
    each = [pair_scores(p, r) for p, r in zip(predictions, references, strict=True)]
    both = text_metrics(predictions, references)
    for key in both:
        assert both[key] == pytest.approx((each[0][key] + each[1][key]) / 2, abs=1e-4)


@pytest.mark.parametrize("prediction, reference", [("", "绿茶"), ("绿茶", ""), (" \n", "绿茶"), ("", "")])
def test_an_empty_side_scores_zero(prediction, reference):
    assert pair_scores(prediction, reference) == dict.fromkeys(("rouge-1", "rouge-2", "rouge-l", "bleu-4"), 0)


def test_identical_texts_and_unrelated_texts():
    texts = ["每天早上九点开门。", "比喻多此一举，反而坏事。"]
    same = text_metrics(texts, texts)
    assert same["rouge-1"] == same["rouge-2"] == same["rouge-l"] == 100  # F1 0.999999995, rounded
    assert 0 < same["bleu-4"] <= 100
    assert text_metrics(["今天不营业。"], ["绿茶很香"])["rouge-1"] == 0


def test_reported_scores_have_no_float_noise():
    predictions, references = (list(side) for side in zip(*PAIRS, strict=True))
    scores = text_metrics(predictions, references)
    for value in scores.values():
        assert value == round(value, 4)
        assert len(json.dumps(value).split(".")[-1]) <= 4
    assert format_metrics(scores) == "  ".join(
        f"{k}: {scores[k]:.2f}" for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
    )


def test_metrics_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        text_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        text_metrics([], [])
