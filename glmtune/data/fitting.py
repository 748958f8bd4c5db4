"""Fitting a sample to `max_seq_length`: cap each answer, then truncate the prompt, slide windows over the
sample, or drop it (see `LengthSettings` for what each keeps)."""

from __future__ import annotations

from collections.abc import Sequence

from glmtune.data.samples import IGNORE_INDEX, Sample, supervised_spans
from glmtune.data.settings import LengthSettings


def fit_length(ids: Sequence[int], labels: Sequence[int], s: LengthSettings) -> tuple[list[Sample], str]:
    """Make one sample fit `s.max_seq_length`: (samples, outcome) with outcome "ok", "truncated", "split"
    (slide made several windows) or "dropped" (also for a sample with no supervised token)."""
    ids, labels = list(ids), list(labels)
    cap = s.max_target_length
    if cap is None and len(ids) <= s.max_seq_length:  # the common case, without the span analysis
        if labels.count(IGNORE_INDEX) == len(labels):
            return [], "dropped"
        return [(ids, labels)], "ok"
    spans = supervised_spans(labels)
    if not spans:
        return [], "dropped"
    outcome = "ok"
    if cap is not None and any(end - start > cap for start, end in spans):
        # Each answer keeps its first cap-1 tokens and its last (end-of-answer) token.
        drop = set()
        for start, end in spans:
            if end - start > cap:
                drop.update(range(start + cap - 1, end - 1))
        ids = [t for i, t in enumerate(ids) if i not in drop]
        labels = [t for i, t in enumerate(labels) if i not in drop]
        spans = supervised_spans(labels)
        outcome = "truncated"
    n, limit = len(ids), s.max_seq_length
    if n <= limit:
        return [(ids, labels)], outcome
    if s.strategy == "drop":
        return [], "dropped"
    if s.strategy == "truncate":
        return _truncate(ids, labels, spans[-1][0], s)
    return _slide(ids, labels, s)


def _truncate(
    ids: list[int], labels: list[int], answer_start: int, s: LengthSettings
) -> tuple[list[Sample], str]:
    n, limit = len(ids), s.max_seq_length
    p, a = answer_start, n - answer_start
    head = min(s.protected_head, p)
    tail = min(s.protected_tail, p - head)
    # The prompt gets what it needs up to limit - (guaranteed answer), the answer the rest.
    p_keep = max(head + tail, min(p, limit - min(a, s.answer_min_length)))
    a_keep = min(a, limit - p_keep)
    if a_keep < 1:
        return [], "dropped"
    r = p - p_keep  # prompt tokens to remove, from the unprotected middle [head, p - tail)
    cut = (head, head + r) if s.truncate_side == "prompt_head" else (p - tail - r, p - tail)
    keep = list(range(cut[0])) + list(range(cut[1], p))
    keep += list(range(p, n)) if a_keep == a else list(range(p, p + a_keep - 1)) + [n - 1]
    return [([ids[i] for i in keep], [labels[i] for i in keep])], "truncated"


def _slide(ids: list[int], labels: list[int], s: LengthSettings) -> tuple[list[Sample], str]:
    head = min(s.protected_head, len(ids))
    prefix, prefix_labels = ids[:head], [IGNORE_INDEX] * head
    body, body_labels = ids[head:], labels[head:]
    width, stride = s.window, s.resolved_stride
    windows: list[Sample] = []
    start, covered = 0, 0  # body[:covered] was already supervised by an earlier window
    while True:
        end = min(start + width, len(body))
        window_labels = [IGNORE_INDEX] * max(0, covered - start) + body_labels[max(covered, start) : end]
        if any(label != IGNORE_INDEX for label in window_labels):
            windows.append((prefix + body[start:end], prefix_labels + window_labels))
        covered = end
        if end >= len(body):
            break
        start += stride
    return windows, ("split" if windows else "dropped")
