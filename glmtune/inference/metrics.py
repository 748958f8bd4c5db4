"""ROUGE-1/2/L and BLEU-4 of predictions against references, as ChatGLM's fine-tuning scripts compute them.

THUDM's P-Tuning v2 `main.py` (and LLaMA-Factory after it) score each (prediction, reference) pair on its own
and report the mean over the pairs, so our numbers compare with their published tables:

- ROUGE: jieba splits both texts into words, rouge-chinese scores the space-joined words; the F1 of each of
  rouge-1/2/l, x100.
- BLEU-4: nltk's `sentence_bleu` on characters (the reference as the one reference), smoothing method 3, x100.

Each per-pair score is rounded to 4 decimals as the published script does, and so is each mean (no float
noise in printed or saved scores). A pair whose prediction or reference is empty (or only whitespace) scores
0 on every metric: rouge-chinese refuses such texts (the published script crashes there) and nltk gives 0.
All scores are percentages (0-100). The libraries come with `pip install glmtune[eval]`.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")
METRIC_KEYS = (*ROUGE_KEYS, "bleu-4")
DECIMALS = 4
EVAL_PACKAGES = {"jieba": "jieba", "rouge_chinese": "rouge-chinese", "nltk": "nltk"}


def missing_packages() -> list[str]:
    """The [eval] extra's packages that are not installed (pip names)."""
    return [pip for module, pip in EVAL_PACKAGES.items() if importlib.util.find_spec(module) is None]


def pair_scores(prediction: str, reference: str) -> dict[str, float]:
    """{"rouge-1", "rouge-2", "rouge-l", "bleu-4"} of one pair, x100, rounded to 4 decimals."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    if not prediction.split() or not reference.split():
        return dict.fromkeys(METRIC_KEYS, 0.0)
    jieba.setLogLevel(logging.WARNING)  # otherwise it logs its dictionary loading on first use
    hypothesis, words = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
    rouge = Rouge().get_scores(hypothesis, words)[0]
    scores = {key: round(rouge[key]["f"] * 100, DECIMALS) for key in ROUGE_KEYS}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(float(bleu) * 100, DECIMALS)
    return scores


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{"rouge-1", "rouge-2", "rouge-l", "bleu-4"}: the mean over the pairs of `pair_scores`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    per_pair = [pair_scores(p, r) for p, r in zip(predictions, references, strict=True)]
    return {key: round(sum(s[key] for s in per_pair) / len(per_pair), DECIMALS) for key in METRIC_KEYS}


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{key}: {metrics[key]:.2f}" for key in METRIC_KEYS)
