"""The build's worker processes: the data files are cut into chunks of records (`read_chunks`), each worker
turns a chunk into samples fitted to length (`process_chunk`), and `ordered_map` hands the results back in
reading order, so the records do not depend on the number of workers or the chunk size.

Each worker holds one template (made in the worker from the factory when the template cannot be pickled) and
the build's `BuildSettings`.
"""

from __future__ import annotations

import itertools
import multiprocessing
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glmtune.data.fitting import fit_length
from glmtune.data.readers import (
    DataError,
    Dialogue,
    DialogueParser,
    decode_json_line,
    is_json_array,
    iter_dialogues,
    iter_line_chunks,
    parse_json_lines,
)
from glmtune.data.samples import IGNORE_INDEX, Template, build_samples
from glmtune.data.settings import BuildSettings

_WORKER: dict[str, Any] = {}
if array("i").itemsize != 4:  # the records are int32
    raise ImportError("glmtune.data.workers needs a platform whose C int is 32 bits")


def _init_worker(
    template: Template | None, template_factory: Callable[[], Template] | None, settings: BuildSettings
) -> None:
    template = template_factory() if template_factory is not None else template
    _WORKER["template"] = template
    _WORKER["settings"] = settings
    _WORKER["fit"] = settings.lengths_for(template)


@dataclass
class Chunk:
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
class ChunkResult:
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
    """Append one sample to a chunk's buffers (see `ChunkResult`). Converting Python ints is most of the
    cost here: the usual labels, -100 on a prompt and then the ids themselves, are not converted at all."""
    ids_out.fromlist(ids)
    p = labels.count(IGNORE_INDEX)
    if labels[p:] == ids[p:] and labels[:p] == [IGNORE_INDEX] * p:
        prompt.append(p)
    else:
        prompt.append(-1)
        labels_out.fromlist(labels)


def process_chunk(chunk: Chunk) -> ChunkResult:
    template, settings, fit = _WORKER["template"], _WORKER["settings"], _WORKER["fit"]
    multi_turn, stop_at_error = settings.multi_turn, settings.on_error == "raise"
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
        except DataError:  # data the template cannot take (tool calls for a template without tools)
            raise
        except Exception as e:
            raise RuntimeError(f"{dialogue.source}: the template failed: {type(e).__name__}: {e}") from e
        written = 0
        for ids, labels in built:
            counts["samples_built"] += 1
            lengths.append(len(ids))
            fitted, outcome = fit_length(ids, labels, fit)
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
    return ChunkResult(
        chunk.split, chunk.name, compact, sizes, prompt, labels_out, per_dialogue, errors, counts, lengths
    )


def sources(settings: BuildSettings) -> list[tuple[str, Path]]:
    """(split, data file) in reading order: the train files, then the eval files."""
    return [("train", f) for f in settings.train_files] + [("eval", f) for f in settings.eval_files]


def built_chunks(
    settings: BuildSettings, template: Template, template_factory: Callable[[], Template] | None
) -> Iterator[ChunkResult]:
    """The samples of every chunk of the data files, in reading order, built by `settings.num_workers`
    processes (1: in this process). Like Pool.imap, but with at most 4 * num_workers chunks in flight: imap's
    feeder thread would read the whole input ahead into memory. With a factory, each worker makes its own
    template from it (the template need not pickle); in this process, `template` is used."""
    chunks = read_chunks(sources(settings), settings.format, settings.chunk_size)
    workers = settings.num_workers
    if workers <= 1:
        _init_worker(template, None, settings)
        try:
            yield from map(process_chunk, chunks)
        finally:
            _WORKER.clear()
        return
    initargs = (
        (None, template_factory, settings) if template_factory is not None else (template, None, settings)
    )
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(process_chunk, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def read_chunks(sources: Sequence[tuple[str, Path]], format: str, size: int) -> Iterator[Chunk]:
    """The chunks of the data files, in order. JSON lines are read here but decoded by the workers; a JSON
    array is parsed here (it is one JSON document)."""
    for split, path in sources:
        if is_json_array(path):
            for items in _chunks(iter_dialogues(path, format, errors="yield"), size):
                yield Chunk(split, f"{path}", items=items)
            continue
        parse = DialogueParser(f"{path}", format)  # decides an "auto" format: the workers need it
        for first_line, lines in iter_line_chunks(path, size):
            yield Chunk(split, f"{path}", format=parse.format, first_line=first_line, lines=lines)
            for lineno, raw in enumerate(lines, first_line):
                if parse.format != "auto":
                    break
                decoded = decode_json_line(raw, lineno, parse.name)
                if isinstance(decoded, tuple):
                    parse(lineno, *decoded)
