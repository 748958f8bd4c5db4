"""Build tokenized training records from data files: read -> template -> fit to length -> (pack) -> write.

`build_records` streams the files (see `readers`), turns each dialogue into (input_ids, labels) samples with
a chat `Template` (`samples`), makes every sample fit `max_seq_length` (`fitting`: truncate / slide / drop),
optionally packs several samples per sequence (`packing`), all in worker processes (`workers`), and writes
train (and eval) records (see `records`) into `settings.out_dir`:

    out_dir/train/        records (meta.json, data.bin + index.bin or data.mdb, order.npy when shuffled)
    out_dir/eval/         same, when eval_files or eval_ratio is given
    out_dir/report.json   counts and token-length percentiles (`report.BuildReport`)
    out_dir/build_key.json  the settings, data hashes and template rendering the records were built from
    out_dir/rejects.jsonl   bad records skipped with on_error="skip"

The build is atomic and reused while its cache key matches (see `cache`).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm.auto import tqdm

from glmtune.data.cache import REPORT_FILE, BuildKey, locked, rebuild_reasons, replacing
from glmtune.data.packing import Packer
from glmtune.data.readers import DataError
from glmtune.data.records import RecordWriter, open_writer, write_order
from glmtune.data.report import BuildReport, LengthCounts
from glmtune.data.samples import Template, template_name
from glmtune.data.settings import BuildSettings, SettingsError
from glmtune.data.workers import ChunkResult, built_chunks, sources

PLAIN_FIELDS = ("input_ids", "labels")
PACKED_FIELDS = ("input_ids", "labels", "position_ids", "seq_ids")


def build_records(
    settings: BuildSettings,
    *,
    template: Template | None = None,
    template_factory: Callable[[], Template] | None = None,
    tokenizer_fingerprint: str,
    force: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> BuildReport:
    """Build (or reuse) the train/eval records `settings` describes; see the module docstring.

    template / template_factory: the chat `Template`, or a picklable zero-argument callable that makes one
      (called once here and once in each worker process: use it when the template cannot be pickled).
    tokenizer_fingerprint: anything that changes when the tokenizer's ids would (e.g. a hash of its files);
      part of the cache key with the template's rendering, the data files' content hashes and the settings.
    force: rebuild even when the records are up to date.
    """
    started = time.monotonic()
    say = print if verbose else (lambda *a, **k: None)
    if (template is None) == (template_factory is None):
        raise TypeError("build_records: give exactly one of template= and template_factory=")
    if template_factory is not None:
        template = template_factory()
    _check_multi_turn(settings, template)
    lengths = settings.lengths_for(template)
    out_dir = settings.out_dir
    with locked(out_dir):
        key = BuildKey.of(settings, lengths, template, tokenizer_fingerprint)
        reasons = rebuild_reasons(out_dir, key, settings.with_eval, force)
        if not reasons:
            report = BuildReport.from_dict(json.loads((out_dir / REPORT_FILE).read_text(encoding="utf-8")))
            report.out_dir, report.reused, report.reasons = str(out_dir), True, []
            say(
                f"records up to date: {out_dir} ({report.train_records} train, {report.eval_records} eval "
                f"records; key {key.digest[:12]})"
            )
            return report
        say(f"building records in {out_dir}: " + "; ".join(reasons))
        with replacing(out_dir) as tmp:
            factory = template_factory if settings.num_workers > 1 else None
            report = _build_into(tmp, settings, template, factory, progress, say)
            report.out_dir, report.key, report.reasons = str(out_dir), key.digest, reasons
            report.settings = key.settings
            report.seconds = round(time.monotonic() - started, 3)
            (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
            key.write(tmp)  # last: a folder with a matching key is complete
    say(report.summary())
    return report


def _check_multi_turn(settings: BuildSettings, template: Template) -> None:
    if settings.multi_turn != "dialogue":
        return
    if not callable(getattr(template, "build_dialogue_sample", None)):
        raise TypeError(
            f"multi_turn='dialogue' needs a template with build_dialogue_sample(); "
            f"{template_name(template)} has none (use multi_turn='per_turn')"
        )
    if reason := getattr(template, "dialogue_unsupported", None):
        raise SettingsError(
            [f"multi_turn: dialogue is not possible with template {template_name(template)}: {reason}"]
        )


class _Output:
    """Where a build's samples go: a record writer (and, packing, a packer) per split, and the rejects file."""

    def __init__(self, folder: Path, settings: BuildSettings, say: Callable[..., None]):
        self.folder, self.say = folder, say
        fields = PACKED_FIELDS if settings.packing else PLAIN_FIELDS
        splits = ["train"] + (["eval"] if settings.with_eval else [])
        self.writers: dict[str, RecordWriter] = {}
        for split in splits:
            self.writers[split] = open_writer(folder / split, fields=fields, backend=settings.backend)
        self.packers = (
            {split: Packer(settings.max_seq_length) for split in splits} if settings.packing else {}
        )
        self.rejects: TextIO | None = None
        self.rejected = 0

    def reject(self, error: DataError) -> None:
        if self.rejects is None:
            self.rejects = open(self.folder / "rejects.jsonl", "w", encoding="utf-8")
        reject = {"source": error.source, "field": error.field, "error": str(error), "record": error.raw}
        self.rejects.write(json.dumps(reject, ensure_ascii=False) + "\n")
        if self.rejected < 5:
            self.say(f"skipping bad record: {error}", file=sys.stderr)
        self.rejected += 1

    def write(self, result: ChunkResult, to_eval: np.ndarray | None) -> None:
        if self.packers:
            for split, flat in result.samples(to_eval):
                n = len(flat) // 2
                for record in self.packers[split].add(flat[:n], flat[n:]):
                    self.writers[split].write(record)
        else:
            for split, flat, sizes in result.by_split(to_eval):
                self.writers[split].write_many(flat, sizes)

    def flush(self) -> None:
        for split, packer in self.packers.items():
            for record in packer.flush():
                self.writers[split].write(record)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def abort(self) -> None:
        for writer in self.writers.values():
            try:
                writer.abort()
            except Exception:
                pass  # the build's own error is the one to report

    def close_rejects(self) -> None:
        if self.rejects is not None:
            self.rejects.close()


def _build_into(
    tmp: Path,
    settings: BuildSettings,
    template: Template,
    template_factory: Callable[[], Template] | None,
    progress: bool,
    say: Callable[..., None],
) -> BuildReport:
    tmp.mkdir(parents=True)
    report = BuildReport(out_dir=str(tmp), key="", packed=settings.packing)
    counts: Counter = Counter()
    lengths = LengthCounts()
    output: _Output | None = None
    try:
        output = _Output(tmp, settings, say)
        rng = random.Random(settings.seed)
        records_in = dict.fromkeys((f"{path}" for _, path in sources(settings)), 0)  # good and bad, per file
        with tqdm(desc="building records", unit=" dialogues", disable=not progress) as bar:
            for result in built_chunks(settings, template, template_factory):
                for error in result.errors:
                    if settings.on_error == "raise":
                        raise error
                    output.reject(error)
                report.dialogues_read += len(result.per_dialogue)
                records_in[result.file] += len(result.per_dialogue) + len(result.errors)
                draws = None
                if result.split == "train" and settings.eval_ratio:  # in reading order: any chunking
                    draws = [rng.random() < settings.eval_ratio for _ in result.per_dialogue]
                counts.update(result.counts)
                lengths.add(result.lengths)
                report.samples_written += len(result.sizes)
                output.write(result, result.sample_splits(draws))
                bar.update(len(result.per_dialogue))
        output.flush()
        _check_not_empty(settings, records_in, output, report, counts)
        output.close()
    except BaseException:
        if output is not None:
            output.abort()
        raise
    finally:
        if output is not None:
            output.close_rejects()

    train, evaluation = output.writers["train"], output.writers.get("eval")
    if settings.shuffle and train.num_records > 1:
        write_order(tmp / "train", np.random.default_rng(settings.seed).permutation(train.num_records))
    report.rejected = output.rejected
    report.samples_built = counts["samples_built"]
    report.truncated, report.split, report.dropped = counts["truncated"], counts["split"], counts["dropped"]
    report.windows = counts["windows"]
    report.train_records, report.train_tokens = train.num_records, train.num_tokens
    if evaluation is not None:
        report.eval_records, report.eval_tokens = evaluation.num_records, evaluation.num_tokens
    report.lengths = lengths.percentiles()
    if report.rejected:
        say(f"skipped {report.rejected} bad records; they are listed in rejects.jsonl beside the records")
    say(
        f"wrote {report.train_records} train records"
        + (f" and {report.eval_records} eval records" if evaluation is not None else "")
    )
    return report


def _check_not_empty(
    settings: BuildSettings, records_in: dict[str, int], output: _Output, report: BuildReport, counts: Counter
) -> None:
    for name, n in records_in.items():
        if n == 0:
            raise DataError(name, "no records in this data file (it is empty or an empty JSON array)")
    if output.writers["train"].num_records == 0:
        raise DataError(
            ", ".join(f"{path}" for path in settings.train_files),
            f"no training records: {report.dialogues_read} dialogues read, {output.rejected} bad records "
            f"skipped, {counts['dropped']} samples dropped (too long for max_seq_length with strategy "
            f"{settings.strategy!r}, or with no answer token)",
        )


def build_records_cli(settings: BuildSettings, **kwargs: Any) -> int:
    """`build_records` for a command line: a bad record prints its FILE:LINE message to stderr and gives exit
    status 1 (nothing is written); returns 0 on success."""
    try:
        build_records(settings, **kwargs)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
