"""What a build is asked to do, checked in one place: `BuildSettings` (files, lengths, output) and the part of it
that fitting a sample to length reads, `LengthSettings` (with the template's protected tokens added).

`glmtune.data.prepare.build_settings` makes a `BuildSettings` from the `data:` keys of a config; the field
names are the keys' names, so a bad value's message names its key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from glmtune.data.readers import FORMATS
from glmtune.data.records import BACKENDS, Backend
from glmtune.data.samples import MultiTurn, Template, answer_header_length

Strategy = Literal["truncate", "slide", "drop"]
TruncateSide = Literal["prompt_head", "prompt_tail"]
OnError = Literal["raise", "skip"]
Files = str | os.PathLike | Sequence[str | os.PathLike]


class SettingsError(ValueError):
    """Build settings that cannot work (each problem starts with the name of the setting it is about)."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class LengthSettings:
    """How samples are made to fit `max_seq_length` (all token counts).

    - `max_target_length`: cap on each answer (each supervised span); the end-of-answer token (the span's
      last token) is kept. Applies with every strategy.
    - `truncate`: the answer is guaranteed `ensure_answer_min_length` tokens (all of it if shorter; default
      None = half the window), the prompt gets the rest of the window (all of it if shorter), and the answer
      any room the prompt leaves; a cut answer keeps its end-of-answer token. So 1 means "keep the prompt,
      cut the answer", a large value "keep the answer, cut the prompt". `truncate_side` says which part of
      the prompt goes: "prompt_head" (default: drop the oldest context, keep the text next to the answer) or
      "prompt_tail". The "prompt" is everything before the last answer (earlier answers of a dialogue sample
      included); `protected_head`/`protected_tail` prompt tokens are never cut.
    - `slide`: windows of `max_seq_length` tokens starting every `stride` tokens (default: half a window),
      each starting with the `protected_head` tokens; a token is supervised only in the first window that
      contains it (the overlap is context), and windows with no supervised token are dropped.
    - `drop`: samples longer than `max_seq_length` are dropped.
    """

    max_seq_length: int
    strategy: Strategy = "truncate"
    max_target_length: int | None = None
    stride: int | None = None
    ensure_answer_min_length: int | None = None
    truncate_side: TruncateSide = "prompt_head"
    protected_head: int = 0
    protected_tail: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.strategy not in ("truncate", "slide", "drop"):
            problems.append(f"strategy must be truncate, slide or drop, not {self.strategy!r}")
        if self.truncate_side not in ("prompt_head", "prompt_tail"):
            problems.append(f"truncate_side must be prompt_head or prompt_tail, not {self.truncate_side!r}")
        if self.max_seq_length < self.protected_head + self.protected_tail + 1:
            problems.append(
                f"max_seq_length={self.max_seq_length} leaves no room for an answer: the template's prompts "
                f"keep their first {self.protected_head} and last {self.protected_tail} tokens"
            )
        if self.max_target_length is not None and self.max_target_length < 1:
            problems.append(f"max_target_length must be >= 1, not {self.max_target_length}")
        if self.ensure_answer_min_length is not None and self.ensure_answer_min_length < 1:
            problems.append(f"ensure_answer_min_length must be >= 1, not {self.ensure_answer_min_length}")
        if self.stride is not None and not 1 <= self.stride <= self.window:
            problems.append(
                f"stride must be in [1, {self.window}] (max_seq_length - protected_head), not {self.stride}"
            )
        if problems:
            raise SettingsError(problems)

    @property
    def window(self) -> int:
        return self.max_seq_length - self.protected_head

    @property
    def answer_min_length(self) -> int:
        if self.ensure_answer_min_length is not None:
            return self.ensure_answer_min_length
        return max(1, (self.max_seq_length - self.protected_head - self.protected_tail) // 2)

    @property
    def resolved_stride(self) -> int:
        return self.stride if self.stride is not None else max(1, self.window // 2)


@dataclass(frozen=True)
class BuildSettings:
    """What `build_records` builds from which files, and where.

    train_files / eval_files: data files (eval records from other files; or a seeded `eval_ratio` share of the
      training dialogues instead).
    out_dir: the records' folder (see `glmtune.data.build`).
    format: a `readers.FORMATS` name or "auto" (decided per file).
    max_seq_length, max_target_length, strategy, stride, ensure_answer_min_length, truncate_side: how samples
      are made to fit, see `LengthSettings`.
    multi_turn: "per_turn" (one sample per turn, earlier turns as history) or "dialogue" (one sample per
      dialogue; needs template.build_dialogue_sample).
    packing: several samples per record of up to max_seq_length tokens (adds position_ids and seq_ids).
    backend: "record" (flat file + index, memmap) or "lmdb".
    num_workers: tokenizing processes (1: in this process). Output order does not depend on it.
    shuffle, seed: store a seeded shuffled reading order for the train records (the data is not moved); the
      seed also draws the eval_ratio split.
    on_error: "raise" (first bad record raises DataError with FILE:LINE and field; nothing is written) or
      "skip" (bad records are counted and written to out_dir/rejects.jsonl).
    chunk_size: records handed to a worker at a time.
    """

    train_files: Files
    out_dir: str | os.PathLike
    max_seq_length: int
    eval_files: Files | None = None
    format: str = "auto"
    max_target_length: int | None = None
    strategy: Strategy = "truncate"
    stride: int | None = None
    ensure_answer_min_length: int | None = None
    truncate_side: TruncateSide = "prompt_head"
    multi_turn: MultiTurn = "per_turn"
    packing: bool = False
    backend: Backend = "record"
    num_workers: int = 1
    shuffle: bool = False
    seed: int = 0
    on_error: OnError = "raise"
    eval_ratio: float = 0.0
    chunk_size: int = 256

    def __post_init__(self) -> None:
        # Frozen: the normalised paths are set once, here.
        object.__setattr__(self, "train_files", _as_paths(self.train_files))
        object.__setattr__(self, "eval_files", _as_paths(self.eval_files))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        problems = []
        if self.format != "auto" and self.format not in FORMATS:
            problems.append(f"format must be 'auto' or one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.multi_turn not in ("per_turn", "dialogue"):
            problems.append(f"multi_turn must be per_turn or dialogue, not {self.multi_turn!r}")
        if self.backend not in BACKENDS:
            problems.append(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.on_error not in ("raise", "skip"):
            problems.append(f"on_error must be raise or skip, not {self.on_error!r}")
        if not 0.0 <= self.eval_ratio < 1.0:
            problems.append(f"eval_ratio must be in [0, 1), not {self.eval_ratio}")
        if self.eval_ratio and self.eval_files:
            problems.append(
                "eval_ratio and eval_files both given: set eval_files to [] to split the training data, or "
                "eval_ratio to 0"
            )
        if self.chunk_size < 1:
            problems.append(f"chunk_size must be >= 1, not {self.chunk_size}")
        if not self.train_files:
            problems.append("train_files: no data files given")
        for name, files in (("train_files", self.train_files), ("eval_files", self.eval_files)):
            problems += [f"{name}: data file not found: {f}" for f in files if not f.is_file()]
        try:
            self.lengths()  # the template's protected tokens are checked again once the template is known
        except SettingsError as err:
            problems += err.problems
        if problems:
            raise SettingsError(problems)

    @property
    def with_eval(self) -> bool:
        return bool(self.eval_files or self.eval_ratio)

    def lengths(self, protected_head: int = 0, protected_tail: int = 0) -> LengthSettings:
        return LengthSettings(
            max_seq_length=self.max_seq_length,
            strategy=self.strategy,
            max_target_length=self.max_target_length,
            stride=self.stride,
            ensure_answer_min_length=self.ensure_answer_min_length,
            truncate_side=self.truncate_side,
            protected_head=protected_head,
            protected_tail=protected_tail,
        )

    def lengths_for(self, template: Template) -> LengthSettings:
        """The length settings with the prompt tokens `template` needs kept: its own `protected_head` /
        `protected_tail`, and at least its answer header at the prompt's end."""
        head = int(getattr(template, "protected_head", 0) or 0)
        tail = max(int(getattr(template, "protected_tail", 0) or 0), answer_header_length(template))
        return self.lengths(head, tail)


def _as_paths(files: Files | None) -> tuple[Path, ...]:
    if files is None:
        return ()
    if isinstance(files, str | os.PathLike):
        return (Path(files),)
    return tuple(Path(f) for f in files)
