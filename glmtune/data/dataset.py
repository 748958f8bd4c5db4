"""torch side of the records: a map-style Dataset and a padding collator. The attention masks of packed records
live with the models (`glmtune.models.packing`) and are re-exported here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from glmtune.data.records import RecordReader, open_reader, read_meta
from glmtune.data.samples import IGNORE_INDEX
from glmtune.models.packing import block_causal_mask, cu_seqlens

__all__ = ["Collator", "RecordDataset", "block_causal_mask", "collate_fn", "cu_seqlens"]


class RecordDataset(Dataset):
    """Random access to a records folder (`out_dir/train` of `build_records`): item i is a dict of int64
    tensors `input_ids`, `labels` (+ `position_ids`, `seq_ids` for packed records).

    A plain map-style dataset, so DistributedSampler shards it under DDP. Files are opened lazily in each
    process and never pickled, so it can be sent to DataLoader workers (fork or spawn). `path` may also be a
    build's out_dir, meaning its `train` split."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not (path / "meta.json").is_file() and (path / "train" / "meta.json").is_file():
            path = path / "train"
        self.path = path
        self.meta = read_meta(path)
        self.fields: tuple[str, ...] = tuple(self.meta["fields"])
        self.packed = "seq_ids" in self.fields
        self._reader: RecordReader | None = None

    @property
    def reader(self) -> RecordReader:
        if self._reader is None:
            self._reader = open_reader(self.path)
        return self._reader

    def __len__(self) -> int:
        return self.meta["num_records"]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        record = self.reader[i]
        return {k: torch.from_numpy(v.astype(np.int64)) for k, v in record.items()}

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per item (for length-grouped sampling)."""
        return self.reader.lengths

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"] = None
        return state


@dataclass
class Collator:
    """Pads a list of dataset items to the longest one (rounded up to `pad_to_multiple_of`):
    input_ids with `pad_token_id`, labels with -100, position_ids / seq_ids (packed) with 0, and adds
    attention_mask (1 = real token, 0 = padding). A dataclass rather than a closure so it pickles into
    DataLoader workers."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_side: Literal["right", "left"] = "right"

    def __post_init__(self) -> None:
        if not isinstance(self.pad_token_id, int):
            raise ValueError(
                f"pad_token_id must be an int, not {self.pad_token_id!r} (does the tokenizer have one?)"
            )
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be right or left, not {self.padding_side!r}")

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_values = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        batch: dict[str, torch.Tensor] = {}
        for key in items[0]:
            batch[key] = torch.full((len(items), longest), pad_values.get(key, 0), dtype=torch.long)
        batch["attention_mask"] = torch.zeros(len(items), longest, dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            span = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            for key, value in item.items():
                batch[key][row, span] = value
            batch["attention_mask"][row, span] = 1
        return batch


def collate_fn(
    pad_token_id: int, pad_to_multiple_of: int | None = None, padding_side: Literal["right", "left"] = "right"
) -> Collator:
    """The DataLoader `collate_fn` for RecordDataset items; see `Collator`."""
    return Collator(pad_token_id, pad_to_multiple_of, padding_side)
