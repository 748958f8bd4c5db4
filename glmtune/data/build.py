"""Build tokenized training records from data files: read -> template -> fit to length -> (pack) -> write.

`build_records` streams the files (see `readers`), turns each dialogue into (input_ids, labels) samples with
a chat `Template`, makes every sample fit `max_seq_length` (truncate / slide / drop), optionally packs several
samples per sequence, and writes train (and eval) records (see `records`) into `out_dir`:

    out_dir/train/        records (meta.json, data.bin + index.bin or data.mdb, order.npy when shuffled)
    out_dir/eval/         same, when eval_files or eval_ratio is given
    out_dir/report.json   counts and token-length percentiles (BuildReport)
    out_dir/build_key.json  the settings, data hashes and template rendering the records were built from
    out_dir/rejects.jsonl   bad records skipped with on_error="skip"

The build is atomic: it writes into `.{name}.tmp-*` beside `out_dir` and renames it into place at the end, so a
killed build never leaves half-written records where training reads them; leftovers are removed by the next
build, which holds a lock file (`.{name}.lock`) so that concurrent builds (e.g. every DDP rank) run one at a
time and the later ones find the records up to date.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import itertools
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
import uuid
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from glmtune.data.readers import (
    FORMATS,
    DataError,
    Dialogue,
    DialogueParser,
    decode_json_line,
    is_json_array,
    iter_dialogues,
    iter_line_chunks,
    parse_json_lines,
)
from glmtune.data.records import BACKENDS, Backend, RecordWriter, open_writer, read_meta, write_order

Strategy = Literal["truncate", "slide", "drop"]
MultiTurn = Literal["per_turn", "dialogue"]
TruncateSide = Literal["prompt_head", "prompt_tail"]
OnError = Literal["raise", "skip"]
Sample = tuple[list[int], list[int]]

IGNORE_INDEX = -100
# Bump when the build code changes the records a given key produces (2: "chatglm3" is the chat format; 3: the
# key holds the template's rendering of PROBE_DIALOGUE).
BUILD_VERSION = 3
PLAIN_FIELDS = ("input_ids", "labels")
PACKED_FIELDS = ("input_ids", "labels", "position_ids", "seq_ids")


class SettingsError(ValueError):
    """Build settings that cannot work together (the message names them)."""


@runtime_checkable
class Template(Protocol):
    """What the data pipeline needs from a chat prompt builder (glmtune/tokenizers/prompts.py).

    `build_train_sample` returns (input_ids, labels) with labels IGNORE_INDEX (-100) on the prompt and the
    token ids on the answer and its end-of-answer token. Optional extras, looked up with getattr:

    - `build_dialogue_sample(turns) -> (input_ids, labels)`: one sample supervising every answer
      (needed for multi_turn="dialogue"), and `dialogue_unsupported: str | None`, the reason a template
      that has the method cannot use it (ChatGLM-6B: its prompt is read bidirectionally).
    - a `system` keyword argument on either method: the system prompt. Without it the system prompt is put
      before the first query, separated by a newline.
    - `name: str` (or `fingerprint`): identifies the prompt format in the records' cache key.
    - `protected_head` / `protected_tail: int`: how many tokens at the start / end of the prompt truncation and
      sliding windows must keep (e.g. 2 for ChatGLM2's `[gMASK] sop` prefix). Default 0. The tokens every
      prompt ends with (its answer header: `答：`, `[/INST]`, `<|assistant|>`...) are found by
      `answer_header_length` and kept too.
    """

    def build_train_sample(
        self, query: str, response: str, history: Sequence[tuple[str, str]] | None = None
    ) -> tuple[list[int], list[int]]: ...


def template_name(template: Any) -> str:
    for attr in ("fingerprint", "name"):
        value = getattr(template, attr, None)
        if isinstance(value, str) and value:
            return value
    cls = type(template)
    return f"{cls.__module__}.{cls.__qualname__}"


def _accepts(fn: Callable | None, name: str) -> bool:
    if fn is None:
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


# ----------------------------------------------------------------------------------------------------------
# Dialogue -> samples


def build_samples(dialogue: Dialogue, template: Template, multi_turn: MultiTurn = "per_turn") -> list[Sample]:
    """The (input_ids, labels) samples of one dialogue: one per turn with the earlier turns as history
    ("per_turn"), or one for the whole dialogue supervising every answer ("dialogue")."""
    turns = list(dialogue.turns)
    method = (
        template.build_train_sample
        if multi_turn == "per_turn"
        else getattr(template, "build_dialogue_sample", None)
    )
    if method is None:
        raise TypeError(
            f"template {template_name(template)} has no build_dialogue_sample(); use multi_turn='per_turn'"
        )
    kwargs: dict[str, Any] = {}
    if dialogue.system:
        if _accepts(method, "system"):
            kwargs["system"] = dialogue.system
        else:
            turns[0] = (f"{dialogue.system}\n{turns[0][0]}", turns[0][1])
    if multi_turn == "dialogue":
        ids, labels = method(turns, **kwargs)
        return [(list(ids), list(labels))]
    samples = []
    for i, (query, answer) in enumerate(turns):
        ids, labels = method(query, answer, history=turns[:i] or None, **kwargs)
        samples.append((list(ids), list(labels)))
    return samples


# The dialogue every template renders for the records' cache key: two turns, Chinese and English, and a
# system prompt, so that a change to how the template renders a query, an answer, the history or the system
# prompt changes the key.
PROBE_DIALOGUE = Dialogue(
    turns=[
        ("你好，请介绍一下你自己。", "我是一个人工智能助手，很高兴认识你。"),
        ("What is 1 + 1?", "1 + 1 = 2."),
    ],
    system="You are a helpful assistant.",
    source="<template probe>",
)


def template_fingerprint(template: Template, multi_turn: MultiTurn) -> str:
    """Hash of what `template` renders on PROBE_DIALOGUE: the training samples (ids and labels) of
    `multi_turn`, and the chat prompt of the last turn (what inference shows the model) where the template has
    `build_chat_prompt`. The template's name alone would miss an edit to its code."""
    samples = build_samples(PROBE_DIALOGUE, template, multi_turn)
    rendered: dict[str, Any] = {
        "samples": [[[int(t) for t in ids], [int(t) for t in labels]] for ids, labels in samples]
    }
    chat_prompt = getattr(template, "build_chat_prompt", None)
    if callable(chat_prompt):
        *history, (query, _) = PROBE_DIALOGUE.turns
        prompt = chat_prompt(query, history, system=PROBE_DIALOGUE.system)
        rendered["chat_prompt"] = [int(t) for t in prompt.input_ids]
    return hashlib.sha256(json.dumps(rendered).encode()).hexdigest()[:16]


# Queries ending in different characters: what their prompts have in common at the end is the template's.
HEADER_PROBES = ("你好", "hello", "1 + 1 = ?")


def answer_header_length(template: Template) -> int:
    """How many tokens the template puts after every query, before the answer (ChatGLM2's `\\n\\n答：`,
    LLaMA-2's `[/INST]`, ChatGLM3's `<|assistant|>`, ChatGLM-6B's `[gMASK]`, after `答：` once there is
    history): the common end of the prompts of queries that end differently, without and with history.
    Cutting the prompt's tail must keep them, or training shows the model prompts that chat() never builds."""
    longest = 0
    for history in ([], [("你好", "好的。")]):
        prompts = []
        for query in HEADER_PROBES:
            dialogue = Dialogue(turns=[*history, (query, "好的。")], source="<template probe>")
            ids, labels = build_samples(dialogue, template)[-1]
            prompts.append(ids[: supervised_spans(labels)[-1][0]])
        n = 0
        while all(len(p) > n for p in prompts) and len({p[-1 - n] for p in prompts}) == 1:
            n += 1
        longest = max(longest, n)
    return longest


# ----------------------------------------------------------------------------------------------------------
# Fitting samples to max_seq_length


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
            raise SettingsError("; ".join(problems))

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


def supervised_spans(labels: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of supervised (!= -100) labels."""
    supervised = (np.asarray(labels) != IGNORE_INDEX).astype(np.int8)
    edges = np.diff(supervised, prepend=0, append=0)  # +1 where a run starts, -1 just after it ends
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


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


# ----------------------------------------------------------------------------------------------------------
# Packing


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


# ----------------------------------------------------------------------------------------------------------
# Worker processes: each holds one template (created from the factory in the worker) and the settings.

_WORKER: dict[str, Any] = {}
if array("i").itemsize != 4:  # the records are int32
    raise ImportError("glmtune.data.build needs a platform whose C int is 32 bits")


def _init_worker(
    template: Any,
    template_factory: Callable[[], Any] | None,
    settings: LengthSettings,
    multi_turn: str,
    stop_at_error: bool,
):
    _WORKER["template"] = template_factory() if template_factory is not None else template
    _WORKER["settings"] = settings
    _WORKER["multi_turn"] = multi_turn
    _WORKER["stop_at_error"] = stop_at_error


@dataclass
class _Chunk:
    """Consecutive records of one data file, for one worker: raw JSON lines (`lines`, the first being line
    `first_line` of file `name`, decoded in the worker: the main process only reads) or dialogues already
    parsed (`items`, from JSON array file `name`). `format` is the file's format ("auto": not decided before)."""

    split: str
    name: str
    format: str = "auto"
    first_line: int = 1
    lines: list[bytes] | None = None
    items: list[Dialogue | DataError] | None = None

    def dialogues(self) -> list[Dialogue | DataError]:
        if self.items is not None:
            return self.items
        return parse_json_lines(self.name, self.lines or [], self.first_line, self.format)


@dataclass
class _ChunkResult:
    """The samples of a chunk, in order, compact for the hand-over between processes (which costs the main
    process about as much as the rest of its work): the input ids of all samples back to back (`ids`: uint16
    when they fit, else int32), `sizes[k]` tokens for sample k, and its labels as `prompt[k]`, the number of
    leading -100 labels before labels equal to the ids, or -1 when the labels are stored in `labels` (in
    order). `flat()` gives the records' stored layout. `per_dialogue[d]`: how many samples the chunk's d-th
    good dialogue gave; `errors`: its bad records, in order (with on_error="raise", only the first: the chunk
    stops there). `file`: the data file the chunk came from."""

    split: str
    file: str
    ids: np.ndarray
    sizes: array
    prompt: array
    labels: array
    per_dialogue: list[int]
    errors: list[DataError]
    counts: Counter
    lengths: array  # lengths as built, before fitting (for the report's percentiles)

    def flat(self) -> np.ndarray:
        """All samples in the stored layout: sample k is its `sizes[k]` ids, then as many labels (int32)."""
        ids = self.ids.astype(np.int32)
        flat = np.empty(2 * len(ids), np.int32)
        explicit = np.frombuffer(self.labels, np.int32)
        at, used = 0, 0  # position in ids, labels taken from `explicit`
        for n, p in zip(self.sizes, self.prompt):
            out = 2 * at
            flat[out : out + n] = ids[at : at + n]
            if p >= 0:
                flat[out + n : out + n + p] = IGNORE_INDEX
                flat[out + n + p : out + 2 * n] = ids[at + p : at + n]
            else:
                flat[out + n : out + 2 * n] = explicit[used : used + n]
                used += n
            at += n
        return flat

    def sample_splits(self, eval_draws: Sequence[bool] | None) -> np.ndarray | None:
        """Per sample, whether it goes to eval, given each good dialogue's draw (None: all in `split`)."""
        if eval_draws is None:
            return None
        return np.repeat(np.asarray(eval_draws, bool), self.per_dialogue)

    def samples(self, to_eval: np.ndarray | None) -> Iterator[tuple[str, np.ndarray]]:
        """(split, [ids..., labels...]) per sample."""
        flat = self.flat()
        offset = 0
        for k, n in enumerate(self.sizes):
            split = "eval" if to_eval is not None and to_eval[k] else self.split
            yield split, flat[offset : offset + 2 * n]
            offset += 2 * n

    def by_split(self, to_eval: np.ndarray | None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(split, flat, sizes) with the samples of each split, in order."""
        flat = self.flat()
        sizes = np.frombuffer(self.sizes, np.int64)
        if to_eval is None or not to_eval.any():
            yield self.split, flat, sizes
            return
        if to_eval.all():
            yield "eval", flat, sizes
            return
        elements = np.repeat(to_eval, 2 * sizes)
        yield self.split, flat[~elements], sizes[~to_eval]
        yield "eval", flat[elements], sizes[to_eval]


def _append_sample(
    ids_out: array, prompt: array, labels_out: array, ids: list[int], labels: list[int]
) -> None:
    """Append one sample to a chunk's buffers (see `_ChunkResult`). Converting Python ints is most of the
    cost here: the usual labels, -100 on a prompt and then the ids themselves, are not converted at all."""
    ids_out.fromlist(ids)
    p = labels.count(IGNORE_INDEX)
    if labels[p:] == ids[p:] and labels[:p] == [IGNORE_INDEX] * p:
        prompt.append(p)
    else:
        prompt.append(-1)
        labels_out.fromlist(labels)


def _process_chunk(chunk: _Chunk) -> _ChunkResult:
    template, settings, multi_turn = _WORKER["template"], _WORKER["settings"], _WORKER["multi_turn"]
    stop_at_error = _WORKER["stop_at_error"]
    id_buf, sizes, lengths = array("i"), array("q"), array("i")
    prompt, labels_out = array("i"), array("i")
    per_dialogue: list[int] = []
    errors: list[DataError] = []
    counts: Counter = Counter()
    for dialogue in chunk.dialogues():
        if isinstance(dialogue, DataError):
            errors.append(dialogue)
            if stop_at_error:
                break
            continue
        try:
            built = build_samples(dialogue, template, multi_turn)
        except Exception as e:
            raise RuntimeError(f"{dialogue.source}: the template failed: {type(e).__name__}: {e}") from e
        written = 0
        for ids, labels in built:
            counts["samples_built"] += 1
            lengths.append(len(ids))
            fitted, outcome = fit_length(ids, labels, settings)
            counts[outcome] += 1
            if outcome == "split":
                counts["windows"] += len(fitted)
            for fitted_ids, fitted_labels in fitted:
                _append_sample(id_buf, prompt, labels_out, fitted_ids, fitted_labels)
                sizes.append(len(fitted_ids))
            written += len(fitted)
        per_dialogue.append(written)
    compact = np.frombuffer(id_buf, np.int32)
    if len(compact) and 0 <= compact.min() and compact.max() <= np.iinfo(np.uint16).max:
        compact = compact.astype(np.uint16)  # half the bytes to hand over, for vocabularies up to 65536
    return _ChunkResult(
        chunk.split, chunk.name, compact, sizes, prompt, labels_out, per_dialogue, errors, counts, lengths
    )


def _ordered_map(fn: Callable, items: Iterable, num_workers: int, initargs: tuple) -> Iterator:
    """fn over items, results in order. Like Pool.imap, but with at most 4 * num_workers chunks in flight:
    imap's feeder thread would read the whole input ahead into memory."""
    if num_workers <= 1:
        _init_worker(*initargs)
        try:
            yield from map(fn, items)
        finally:
            _WORKER.clear()
        return
    with multiprocessing.Pool(num_workers, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 4 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _read_chunks(sources: Sequence[tuple[str, Path]], format: str, size: int) -> Iterator[_Chunk]:
    """The chunks of the data files, in order. JSON lines are read here but decoded by the workers; a JSON
    array is parsed here (it is one JSON document)."""
    for split, path in sources:
        if is_json_array(path):
            for items in _chunks(iter_dialogues(path, format, errors="yield"), size):
                yield _Chunk(split, f"{path}", items=items)
            continue
        parse = DialogueParser(f"{path}", format)  # decides an "auto" format: the workers need it
        for first_line, lines in iter_line_chunks(path, size):
            yield _Chunk(split, f"{path}", format=parse.format, first_line=first_line, lines=lines)
            for lineno, raw in enumerate(lines, first_line):
                if parse.format != "auto":
                    break
                decoded = decode_json_line(raw, lineno, parse.name)
                if isinstance(decoded, tuple):
                    parse(lineno, *decoded)


# ----------------------------------------------------------------------------------------------------------
# Report, cache key, atomic output folder


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


def _percentiles(length_counts: np.ndarray) -> dict[str, float]:
    total = int(length_counts.sum())
    if total == 0:
        return {}
    cumulative = np.cumsum(length_counts)
    result: dict[str, float] = {}
    for p in (50, 90, 99):  # nearest rank
        result[f"p{p}"] = int(np.searchsorted(cumulative, int(np.ceil(p / 100 * total))))
    result["max"] = int(np.nonzero(length_counts)[0][-1])
    result["mean"] = round(float((np.arange(len(length_counts)) * length_counts).sum() / total), 2)
    return result


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """Content hash of a data file (the whole content: size and mtime alone can miss an edit)."""
    path = Path(path)
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"path": str(path), "size": path.stat().st_size, "sha256": digest}


def _describe_changes(
    old: dict[str, Any], new: dict[str, Any], old_files: dict, new_files: dict
) -> list[str]:
    reasons = []
    for kind in ("train", "eval"):
        before, after = old_files.get(kind, []), new_files.get(kind, [])
        if [f["path"] for f in before] != [f["path"] for f in after]:
            reasons.append(f"{kind} files: {[f['path'] for f in before]} -> {[f['path'] for f in after]}")
        for b, a in zip(before, after):
            if b["path"] == a["path"] and b["sha256"] != a["sha256"]:
                reasons.append(f"{kind} file {a['path']} changed")
    for key in sorted(set(old) | set(new)):
        if key in ("train_files", "eval_files"):
            continue
        if old.get(key) != new.get(key):
            reasons.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return reasons or ["build key changed"]


@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_complete(out_dir: Path, with_eval: bool) -> bool:
    try:
        read_meta(out_dir / "train")
        if with_eval:
            read_meta(out_dir / "eval")
    except (FileNotFoundError, ValueError):
        return False
    return (out_dir / "report.json").is_file()


def _as_paths(files: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    if files is None:
        return []
    if isinstance(files, str | os.PathLike):
        return [Path(files)]
    return [Path(f) for f in files]


# ----------------------------------------------------------------------------------------------------------
# The build


def build_records(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    out_dir: str | os.PathLike,
    template: Template | None = None,
    template_factory: Callable[[], Template] | None = None,
    tokenizer_fingerprint: str,
    format: str = "auto",
    max_seq_length: int,
    max_target_length: int | None = None,
    strategy: Strategy = "truncate",
    stride: int | None = None,
    ensure_answer_min_length: int | None = None,
    truncate_side: TruncateSide = "prompt_head",
    multi_turn: MultiTurn = "per_turn",
    packing: bool = False,
    backend: Backend = "record",
    num_workers: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    on_error: OnError = "raise",
    eval_files: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    eval_ratio: float = 0.0,
    chunk_size: int = 256,
    force: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> BuildReport:
    """Build (or reuse) train/eval records in `out_dir` from data `files`; see the module docstring.

    template / template_factory: the chat `Template`, or a picklable zero-argument callable that makes one
      (called once here and once in each worker process: use it when the template cannot be pickled).
    tokenizer_fingerprint: anything that changes when the tokenizer's ids would (e.g. a hash of its files);
      part of the cache key with the template name, the data files' content hashes and every setting.
    format: a `readers.FORMATS` name or "auto" (decided per file).
    max_seq_length, max_target_length, strategy, stride, ensure_answer_min_length, truncate_side: see
      `LengthSettings`. multi_turn: "per_turn" (one sample per turn, earlier turns as history) or
      "dialogue" (one sample per dialogue; needs template.build_dialogue_sample).
    packing: several samples per record of up to max_seq_length tokens (adds position_ids and seq_ids).
    backend: "record" (flat file + index, memmap) or "lmdb".
    num_workers: tokenizing processes (1: in this process). Output order does not depend on it.
    shuffle, seed: store a seeded shuffled reading order for the train records (the data is not moved).
    on_error: "raise" (first bad record raises DataError with FILE:LINE and field; nothing is written) or
      "skip" (bad records are counted and written to out_dir/rejects.jsonl).
    eval_files / eval_ratio: eval records from other files, or a seeded share of the dialogues.
    force: rebuild even when the records are up to date.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    train_files, eval_paths = _as_paths(files), _as_paths(eval_files)
    say = print if verbose else (lambda *a, **k: None)

    problems = []
    if (template is None) == (template_factory is None):
        problems.append("give exactly one of template= and template_factory=")
    if format != "auto" and format not in FORMATS:
        problems.append(f"format must be 'auto' or one of {', '.join(FORMATS)}, not {format!r}")
    if multi_turn not in ("per_turn", "dialogue"):
        problems.append(f"multi_turn must be per_turn or dialogue, not {multi_turn!r}")
    if backend not in BACKENDS:
        problems.append(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if on_error not in ("raise", "skip"):
        problems.append(f"on_error must be raise or skip, not {on_error!r}")
    if not 0.0 <= eval_ratio < 1.0:
        problems.append(f"eval_ratio must be in [0, 1), not {eval_ratio}")
    if eval_ratio and eval_paths:
        problems.append("give eval_files or eval_ratio, not both")
    if chunk_size < 1:
        problems.append(f"chunk_size must be >= 1, not {chunk_size}")
    if not train_files:
        problems.append("no data files given")
    problems += [f"data file not found: {f}" for f in train_files + eval_paths if not f.is_file()]
    if problems:
        raise SettingsError("build_records: " + "; ".join(problems))

    if template_factory is not None:
        template = template_factory()
    if multi_turn == "dialogue" and not callable(getattr(template, "build_dialogue_sample", None)):
        raise TypeError(
            f"multi_turn='dialogue' needs a template with build_dialogue_sample(); "
            f"{template_name(template)} has none (use multi_turn='per_turn')"
        )
    if multi_turn == "dialogue" and getattr(template, "dialogue_unsupported", None):
        raise ValueError(
            f"multi_turn='dialogue' is not possible with template {template_name(template)}: "
            f"{template.dialogue_unsupported}"
        )
    lengths = LengthSettings(
        max_seq_length=max_seq_length,
        strategy=strategy,
        max_target_length=max_target_length,
        stride=stride,
        ensure_answer_min_length=ensure_answer_min_length,
        truncate_side=truncate_side,
        protected_head=int(getattr(template, "protected_head", 0) or 0),
        protected_tail=max(int(getattr(template, "protected_tail", 0) or 0), answer_header_length(template)),
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir.parent / f".{out_dir.name}.lock"):
        # We hold the lock: any temp / old folder of ours is left over from a killed build.
        for stale in itertools.chain(
            out_dir.parent.glob(f".{out_dir.name}.tmp-*"), out_dir.parent.glob(f".{out_dir.name}.old-*")
        ):
            shutil.rmtree(stale, ignore_errors=True)

        files_info = {
            "train": [file_digest(f) for f in train_files],
            "eval": [file_digest(f) for f in eval_paths],
        }
        settings: dict[str, Any] = {
            "build_version": BUILD_VERSION,
            "tokenizer": tokenizer_fingerprint,
            "template": template_name(template),
            "template_rendering": template_fingerprint(template, multi_turn),
            "format": format,
            **asdict(lengths),
            # settings that do not matter for the strategy in use must not force a rebuild
            "stride": stride if strategy == "slide" else None,
            "ensure_answer_min_length": ensure_answer_min_length if strategy == "truncate" else None,
            "multi_turn": multi_turn,
            "packing": packing,
            "backend": backend,
            "shuffle": shuffle,
            "eval_ratio": eval_ratio,
            "seed": seed if (shuffle or eval_ratio) else None,
            "on_error": on_error,
            "train_files": [f["sha256"] for f in files_info["train"]],
            "eval_files": [f["sha256"] for f in files_info["eval"]],
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        with_eval = bool(eval_paths or eval_ratio)

        key_file = out_dir / "build_key.json"
        try:
            previous = json.loads(key_file.read_text(encoding="utf-8")) if key_file.is_file() else None
        except (OSError, ValueError):
            previous = {"key": None}  # unreadable: rebuild
        if previous and previous.get("key") == key and not force and _is_complete(out_dir, with_eval):
            report = BuildReport.from_dict(json.loads((out_dir / "report.json").read_text(encoding="utf-8")))
            report.out_dir, report.reused, report.reasons = str(out_dir), True, []
            say(
                f"records up to date: {out_dir} ({report.train_records} train, {report.eval_records} eval "
                f"records; key {key[:12]})"
            )
            return report
        if out_dir.exists() and previous is None and any(out_dir.iterdir()):
            raise FileExistsError(
                f"{out_dir} exists and is not a glmtune records folder; refusing to replace it"
            )
        if previous is None:
            reasons = ["no records built yet"]
        elif force:
            reasons = ["force=True"]
        elif "settings" not in previous:
            reasons = ["previous build key unreadable"]
        elif previous.get("key") == key:
            reasons = ["previous records incomplete"]
        else:
            reasons = _describe_changes(
                previous.get("settings", {}), settings, previous.get("files", {}), files_info
            )
        say(f"building records in {out_dir}: " + "; ".join(reasons))

        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            report = _build_into(
                tmp,
                train_files=train_files,
                eval_paths=eval_paths,
                # workers make their own template from the factory (it need not pickle)
                template=template if template_factory is None or num_workers <= 1 else None,
                template_factory=template_factory if num_workers > 1 else None,
                lengths=lengths,
                format=format,
                multi_turn=multi_turn,
                packing=packing,
                backend=backend,
                num_workers=num_workers,
                shuffle=shuffle,
                seed=seed,
                on_error=on_error,
                eval_ratio=eval_ratio,
                chunk_size=chunk_size,
                progress=progress,
                say=say,
            )
            report.out_dir, report.key, report.reasons, report.settings = str(out_dir), key, reasons, settings
            report.seconds = round(time.monotonic() - started, 3)
            (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
            # build_key.json last: a folder with it and a matching key is complete.
            (tmp / "build_key.json").write_text(
                json.dumps({"key": key, "settings": settings, "files": files_info}, indent=2) + "\n",
                encoding="utf-8",
            )
            _fsync_dir(tmp)
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            if out_dir.exists():
                os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            _fsync_dir(out_dir.parent)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    say(report.summary())
    return report


def _build_into(
    tmp: Path,
    *,
    train_files: list[Path],
    eval_paths: list[Path],
    template: Any,
    template_factory: Callable[[], Any] | None,
    lengths: LengthSettings,
    format: str,
    multi_turn: str,
    packing: bool,
    backend: Backend,
    num_workers: int,
    shuffle: bool,
    seed: int,
    on_error: str,
    eval_ratio: float,
    chunk_size: int,
    progress: bool,
    say: Callable[..., None],
) -> BuildReport:
    from tqdm.auto import tqdm

    tmp.mkdir(parents=True)
    report = BuildReport(out_dir=str(tmp), key="", packed=packing)
    fields = PACKED_FIELDS if packing else PLAIN_FIELDS
    splits = ["train"] + (["eval"] if eval_paths or eval_ratio else [])
    writers: dict[str, RecordWriter] = {}
    rejects_file = None
    try:
        for split in splits:
            writers[split] = open_writer(tmp / split, fields=fields, backend=backend)
        packers = {split: Packer(lengths.max_seq_length) for split in splits} if packing else {}
        rng = random.Random(seed)

        sources = [("train", f) for f in train_files] + [("eval", f) for f in eval_paths]
        length_counts = np.zeros(1024, np.int64)
        counts: Counter = Counter()
        records_in = dict.fromkeys((f"{path}" for _, path in sources), 0)  # good and bad, per data file
        initargs = (template, template_factory, lengths, multi_turn, on_error == "raise")
        bar = tqdm(desc="building records", unit=" dialogues", disable=not progress)
        with bar:
            for result in _ordered_map(
                _process_chunk, _read_chunks(sources, format, chunk_size), num_workers, initargs
            ):
                for error in result.errors:
                    if on_error == "raise":
                        raise error
                    if rejects_file is None:
                        rejects_file = open(tmp / "rejects.jsonl", "w", encoding="utf-8")
                    reject = {
                        "source": error.source,
                        "field": error.field,
                        "error": str(error),
                        "record": error.raw,
                    }
                    rejects_file.write(json.dumps(reject, ensure_ascii=False) + "\n")
                    if report.rejected < 5:
                        say(f"skipping bad record: {error}", file=sys.stderr)
                    report.rejected += 1
                report.dialogues_read += len(result.per_dialogue)
                records_in[result.file] += len(result.per_dialogue) + len(result.errors)
                draws = None
                if (
                    result.split == "train" and eval_ratio
                ):  # in reading order: the same split for any chunking
                    draws = [rng.random() < eval_ratio for _ in result.per_dialogue]
                to_eval = result.sample_splits(draws)
                counts.update(result.counts)
                if result.lengths:
                    chunk_counts = np.bincount(np.frombuffer(result.lengths, np.int32))
                    if len(chunk_counts) > len(length_counts):
                        chunk_counts[: len(length_counts)] += length_counts
                        length_counts = chunk_counts
                    else:
                        length_counts[: len(chunk_counts)] += chunk_counts
                report.samples_written += len(result.sizes)
                if packing:
                    for split, flat in result.samples(to_eval):
                        n = len(flat) // 2
                        for record in packers[split].add(flat[:n], flat[n:]):
                            writers[split].write(record)
                else:
                    for split, flat, sizes in result.by_split(to_eval):
                        writers[split].write_many(flat, sizes)
                bar.update(len(result.per_dialogue))
        for split, packer in packers.items():
            for record in packer.flush():
                writers[split].write(record)
        for name, n in records_in.items():
            if n == 0:
                raise DataError(name, "no records in this data file (it is empty or an empty JSON array)")
        if writers["train"].num_records == 0:
            raise DataError(
                ", ".join(f"{path}" for split, path in sources if split == "train"),
                f"no training records: {report.dialogues_read} dialogues read, {report.rejected} bad records "
                f"skipped, {counts['dropped']} samples dropped (too long for max_seq_length with strategy "
                f"{lengths.strategy!r}, or with no answer token)",
            )
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            try:
                writer.abort()
            except Exception:
                pass
        raise
    finally:
        if rejects_file is not None:
            rejects_file.close()

    if shuffle and writers["train"].num_records > 1:
        write_order(tmp / "train", np.random.default_rng(seed).permutation(writers["train"].num_records))
    report.samples_built = counts["samples_built"]
    report.truncated, report.split, report.dropped = counts["truncated"], counts["split"], counts["dropped"]
    report.windows = counts["windows"]
    report.train_records, report.train_tokens = writers["train"].num_records, writers["train"].num_tokens
    if "eval" in writers:
        report.eval_records, report.eval_tokens = writers["eval"].num_records, writers["eval"].num_tokens
    report.lengths = _percentiles(length_counts)
    if report.rejected:
        say(f"skipped {report.rejected} bad records; they are listed in rejects.jsonl beside the records")
    say(
        f"wrote {report.train_records} train records"
        + (f" and {report.eval_records} eval records" if "eval" in writers else "")
    )
    return report


def build_records_cli(**kwargs: Any) -> int:
    """`build_records` for a command line: a bad record prints its FILE:LINE message to stderr and gives exit
    status 1 (nothing is written); returns 0 on success."""
    try:
        build_records(**kwargs)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
