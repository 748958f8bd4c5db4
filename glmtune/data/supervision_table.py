"""Training records as a token / id / label table, to see which tokens carry loss (`data_utils.py --inspect N`).

One row per token, as the sanity check of THUDM's ChatGLM3 fine-tuning demo prints it: the token's text, its
id, and its label (the id it is trained to predict there, or -100 where it carries no loss).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from glmtune.data.records import open_reader
from glmtune.data.samples import IGNORE_INDEX


def token_text(tokenizer: Any, token_id: int) -> str:
    """The token as text; its vocabulary piece where decoding it alone gives nothing (SentencePiece's `▁`)."""
    return tokenizer.decode([token_id]) or str(tokenizer.convert_ids_to_tokens(token_id))


def samples_of(record: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) of each sample of a record: one, or several in a packed record (`seq_ids`)."""
    ids, labels = record["input_ids"], record["labels"]
    if "seq_ids" not in record:
        return [(ids, labels)]
    starts = np.flatnonzero(np.diff(record["seq_ids"], prepend=-1)) if len(ids) else np.array([], int)
    bounds = [*starts.tolist(), len(ids)]
    return [(ids[a:b], labels[a:b]) for a, b in zip(bounds, bounds[1:])]


def table(tokenizer: Any, ids: np.ndarray, labels: np.ndarray) -> list[str]:
    """The rows of one sample: `'token'  id -> label`."""
    rows = [f"{'token':>24}  {'id':>7}    {'label':>7}"]
    for token_id, label in zip(ids.tolist(), labels.tolist(), strict=True):
        rows.append(f"{token_text(tokenizer, token_id)!r:>24}  {token_id:>7} -> {label:>7}")
    return rows


def supervision_tables(records_dir: str | Path, tokenizer: Any, n: int) -> Iterator[str]:
    """The lines showing the first `n` samples of a records folder, in the data files' order (training may
    read them shuffled)."""
    reader = open_reader(records_dir)
    shown = 0
    try:
        for index in range(len(reader)):
            for ids, labels in samples_of(reader.stored(index)):
                if shown == n:
                    return
                shown += 1
                supervised = int((labels != IGNORE_INDEX).sum())
                yield (
                    f"sample {shown} (record {index}): {len(ids)} tokens, {supervised} with a label "
                    f"(loss), {len(ids) - supervised} with {IGNORE_INDEX}"
                )
                yield from table(tokenizer, ids, labels)
    finally:
        reader.close()
