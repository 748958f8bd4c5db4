"""What a build read and wrote (`BuildReport`, saved as report.json beside the records)."""

from __future__ import annotations

from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class BuildReport:
    """What a build read and wrote. `lengths`: token-length percentiles of the samples as the template built
    them (before truncation / sliding), to choose max_seq_length from."""

    out_dir: str
    key: str
    reused: bool = False
    reasons: list[str] = field(default_factory=list)
    dialogues_read: int = 0
    rejected: int = 0
    samples_built: int = 0
    truncated: int = 0
    split: int = 0
    windows: int = 0
    dropped: int = 0
    samples_written: int = 0
    train_records: int = 0
    eval_records: int = 0
    train_tokens: int = 0
    eval_tokens: int = 0
    packed: bool = False
    lengths: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def train_dir(self) -> Path:
        return Path(self.out_dir) / "train"

    @property
    def eval_dir(self) -> Path | None:
        path = Path(self.out_dir) / "eval"
        return path if path.is_dir() else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildReport:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> str:
        lines = [
            f"records in {self.out_dir}" + (" (reused)" if self.reused else ""),
            f"  read {self.dialogues_read} dialogues, rejected {self.rejected} bad records",
            f"  built {self.samples_built} samples: {self.truncated} truncated, {self.split} split into "
            f"{self.windows} windows, {self.dropped} dropped; {self.samples_written} written",
            f"  wrote {self.train_records} train records ({self.train_tokens} tokens)"
            + (f", {self.eval_records} eval records ({self.eval_tokens} tokens)" if self.eval_records else "")
            + (" packed" if self.packed else ""),
        ]
        if self.lengths:
            lines.append("  sample tokens: " + ", ".join(f"{k} {v:g}" for k, v in self.lengths.items()))
        return "\n".join(lines)


class LengthCounts:
    """How many samples had each token length, for the report's percentiles."""

    def __init__(self) -> None:
        self.counts = np.zeros(1024, np.int64)

    def add(self, lengths: array) -> None:
        if not lengths:
            return
        counts = np.bincount(np.frombuffer(lengths, np.int32))
        if len(counts) > len(self.counts):
            counts[: len(self.counts)] += self.counts
            self.counts = counts
        else:
            self.counts[: len(counts)] += counts

    def percentiles(self) -> dict[str, float]:
        counts = self.counts
        total = int(counts.sum())
        if total == 0:
            return {}
        cumulative = np.cumsum(counts)
        result: dict[str, float] = {}
        for p in (50, 90, 99):  # nearest rank
            result[f"p{p}"] = int(np.searchsorted(cumulative, int(np.ceil(p / 100 * total))))
        result["max"] = int(np.nonzero(counts)[0][-1])
        result["mean"] = round(float((np.arange(len(counts)) * counts).sum() / total), 2)
        return result
