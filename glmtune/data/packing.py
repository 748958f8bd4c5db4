"""Packing several samples into one record of up to `max_seq_length` tokens, first fit, streaming."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from glmtune.data.samples import IGNORE_INDEX, Sample


def pack_record(samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Concatenate samples into one packed record. position_ids restart at 0 in each sample; seq_ids number the
    samples from 1 (0 is left for padding) so attention can be kept inside a sample (see
    `glmtune.data.dataset.block_causal_mask`). The first label of every sample is -100: it would otherwise be
    predicted from the previous sample's last token."""
    ids, labels, positions, seq_ids = [], [], [], []
    for k, (sample_ids, sample_labels) in enumerate(samples, 1):
        ids += sample_ids
        labels += [IGNORE_INDEX] + list(sample_labels[1:])
        positions += range(len(sample_ids))
        seq_ids += [k] * len(sample_ids)
    return {
        "input_ids": np.asarray(ids, np.int32),
        "labels": np.asarray(labels, np.int32),
        "position_ids": np.asarray(positions, np.int32),
        "seq_ids": np.asarray(seq_ids, np.int32),
    }


class Packer:
    """First-fit packing into sequences of at most `max_seq_length` tokens, streaming: at most `max_open`
    sequences are open at a time (the oldest is closed when another is needed)."""

    def __init__(self, max_seq_length: int, max_open: int = 16):
        self.max_seq_length = max_seq_length
        self.max_open = max_open
        self.bins: list[list[Sample]] = []
        self.free: list[int] = []
        self.num_samples = 0

    def add(self, ids: Sequence[int], labels: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Add one sample; returns the packed records this closed (usually none)."""
        n = len(ids)
        if n > self.max_seq_length:
            raise ValueError(f"sample of {n} tokens does not fit max_seq_length={self.max_seq_length}")
        self.num_samples += 1
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        labels = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
        for b, free in enumerate(self.free):
            if n <= free:
                self.bins[b].append((ids, labels))
                self.free[b] -= n
                return []
        self.bins.append([(ids, labels)])
        self.free.append(self.max_seq_length - n)
        if len(self.bins) > self.max_open:
            self.free.pop(0)
            return [pack_record(self.bins.pop(0))]
        return []

    def flush(self) -> list[dict[str, np.ndarray]]:
        packed = [pack_record(b) for b in self.bins]
        self.bins, self.free = [], []
        return packed
