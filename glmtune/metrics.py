"""ROUGE-1/2/L and BLEU-4 of predictions against references, with Chinese-aware tokenization.

Chinese has no spaces, so word-level metrics need a segmenter. We follow the ChatGLM fine-tuning scripts for
ROUGE: jieba splits both texts into words, rouge-chinese scores each pair (F1, sentence-split on 。！？), and the
per-sample scores are averaged; a pair whose prediction or reference has no tokens scores 0. BLEU-4 is
sacrebleu's corpus BLEU with its "zh" tokenizer (one token per Chinese character, 13a rules elsewhere).
All scores are percentages (0-100). The libraries come with `pip install glmtune[eval]`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")
EVAL_PACKAGES = {"jieba": "jieba", "rouge_chinese": "rouge-chinese", "sacrebleu": "sacrebleu"}


def missing_packages() -> list[str]:
    """The [eval] extra's packages that are not installed (pip names)."""
    import importlib.util

    return [pip for module, pip in EVAL_PACKAGES.items() if importlib.util.find_spec(module) is None]


def segment(text: str) -> list[str]:
    """jieba words of `text`, whitespace dropped."""
    import jieba

    jieba.setLogLevel(logging.WARNING)  # otherwise it logs its dictionary loading on every first use
    return [w for w in jieba.cut(text) if w.strip()]


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100) over the pairs, on jieba words."""
    from rouge_chinese import Rouge

    _check_lengths(predictions, references)
    rouge = Rouge()
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        hyp, ref = segment(prediction), segment(reference)
        if not hyp or not ref:
            continue  # the library refuses empty texts; such a pair has no overlap: 0
        scores = rouge.get_scores(" ".join(hyp), " ".join(ref))[0]
        for key in ROUGE_KEYS:
            totals[key] += scores[key]["f"]
    return {key: 100 * total / len(predictions) for key, total in totals.items()}


def bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (x100), sacrebleu with the Chinese tokenizer."""
    import sacrebleu

    _check_lengths(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize="zh").score)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{"rouge-1", "rouge-2", "rouge-l", "bleu-4"} as percentages."""
    return {**rouge_scores(predictions, references), "bleu-4": bleu4(predictions, references)}


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{key}: {metrics[key]:.2f}" for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"))


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
