"""JSON lines decoded in the worker processes (raw lines handed over in chunks) give the same dialogues, errors,
records, rejects and reports as reading the file in one process."""

import json
from pathlib import Path

import pytest

from glmtune.data.fitting import fit_length
from glmtune.data.readers import DataError, Dialogue, iter_dialogues, iter_line_chunks, parse_json_lines
from glmtune.data.records import open_reader
from glmtune.data.samples import build_samples
from glmtune.data.settings import LengthSettings
from tests.data.test_data_fakes import CharTemplate, build_with, encode, make_char_template

BOM = b"\xef\xbb\xbf"


def paragraph(i: int) -> bytes:
    turns = [{"q": f"问题{i}", "a": f"回答{i}" * (1 + i % 4)}]
    if i % 3 == 0:
        turns.append({"q": f"追问{i}", "a": ["第一行", f"第二行{i}"]})
    return json.dumps({"id": i, "paragraph": turns}, ensure_ascii=False).encode() + b"\n"


def messy_file(path: Path, good: int = 40) -> Path:
    """Good paragraph records mixed with every kind of bad line; the first lines cannot decide the format."""
    lines = [
        BOM + b'"text"\n',  # valid JSON, not an object: line 1 (with a byte-order mark)
        b'{"no_format": 1}\n',  # an object whose keys say no format
        b"\n",  # blank: skipped, but counted
        b"{broken\n",  # invalid JSON
    ]
    for i in range(good):
        lines.append(paragraph(i))
        if i % 7 == 3:
            lines.append(b'{"id": 1, "paragraph": [{"q": "x", "a": "  "}]}\n')  # empty answer
        if i % 11 == 5:
            lines.append(b'{"paragraph": [{"q": "\xff\xfe", "a": "y"}]}\n')  # not UTF-8
        if i % 13 == 6:
            lines.append(b'{"paragraph": [{"a": "y"}]}\r\n')  # missing field, CRLF
        if i % 9 == 8:
            lines.append(b'{"instruction": "x", "output": "y"}\n')  # another format than the file's
    lines.append(b'{"id": 99, "paragraph": [{"q": "last", "a": "line without newline"}]}')
    path.write_bytes(b"".join(lines))
    return path


def describe(item: Dialogue | DataError):
    if isinstance(item, DataError):
        return ("error", str(item), item.source, item.field, item.raw)
    return ("dialogue", item.turns, item.system, item.source, item.meta)


@pytest.mark.parametrize("size", [1, 2, 5, 64])
def test_parsing_raw_line_chunks_matches_reading_the_file(tmp_path, size):
    data = messy_file(tmp_path / "messy.jsonl")
    expected = [describe(item) for item in iter_dialogues(data, errors="yield")]
    assert sum(kind == "error" for kind, *_ in expected) >= 10  # the file exercises the error paths
    assert sum(kind == "dialogue" for kind, *_ in expected) == 41

    got, format, lines_seen = [], "auto", 0
    for first_line, lines in iter_line_chunks(data, size):
        assert first_line == lines_seen + 1 and len(lines) <= size
        lines_seen += len(lines)
        items = parse_json_lines(str(data), lines, first_line, format)
        got += [describe(item) for item in items]
        if format == "auto" and any(isinstance(item, Dialogue) for item in items):
            format = "paragraph"  # what the main process hands the next chunks once the format is known
    assert got == expected
    assert lines_seen == data.read_bytes().count(b"\n") + 1  # the last line has no newline


def test_line_chunks_are_cut_by_bytes_too(tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_bytes(b"".join(b'{"input": "%d", "target": "%s"}\n' % (i, b"x" * 1000) for i in range(50)))
    chunks = list(iter_line_chunks(data, 64, max_bytes=4000))
    assert all(sum(map(len, lines)) < 4000 + 1100 for _, lines in chunks)
    assert [first for first, _ in chunks] == [
        1 + sum(len(c) for _, c in chunks[:k]) for k in range(len(chunks))
    ]
    assert b"".join(line for _, lines in chunks for line in lines) == data.read_bytes()


def expected_records(files, settings: LengthSettings, multi_turn="per_turn"):
    """The records a build must write, computed without build_records: read, template, fit."""
    template, records = CharTemplate(), []
    for path in files:
        for item in iter_dialogues(path, errors="yield"):
            if isinstance(item, DataError):
                continue
            for ids, labels in build_samples(item, template, multi_turn):
                records += fit_length(ids, labels, settings)[0]
    return records


def read_all(path):
    reader = open_reader(path)
    return [(r["input_ids"].tolist(), r["labels"].tolist()) for r in (reader[i] for i in range(len(reader)))]


def build(tmp_path, name, files, **kwargs):
    options = dict(
        out_dir=tmp_path / name,
        template_factory=make_char_template,
        tokenizer_fingerprint="char",
        max_seq_length=40,
        on_error="skip",
        progress=False,
        verbose=False,
    )
    return build_with(files, **{**options, **kwargs})


@pytest.mark.parametrize(
    "settings",
    [
        dict(strategy="truncate"),
        dict(strategy="slide", stride=10),  # windows whose labels are not "-100 then the ids"
        dict(multi_turn="dialogue"),  # earlier answers supervised inside the prompt
    ],
)
def test_workers_on_raw_lines_write_the_expected_records_and_rejects(tmp_path, settings):
    data = messy_file(tmp_path / "messy.jsonl")
    extra = tmp_path / "more.jsonl"
    extra.write_bytes(b"".join(paragraph(i) for i in range(100, 130)))
    lengths = LengthSettings(
        max_seq_length=40,
        strategy=settings.get("strategy", "truncate"),
        stride=settings.get("stride"),
        protected_head=CharTemplate.protected_head,
    )
    expected = expected_records([data, extra], lengths, settings.get("multi_turn", "per_turn"))
    reports, rejects = [], []
    for run, (workers, chunk) in enumerate([(1, 256), (2, 3), (2, 1)]):
        report = build(tmp_path, f"r{run}", [data, extra], num_workers=workers, chunk_size=chunk, **settings)
        assert read_all(report.train_dir) == expected
        reports.append({k: v for k, v in report.to_dict().items() if k not in ("out_dir", "seconds")})
        rejects.append((Path(report.out_dir) / "rejects.jsonl").read_text(encoding="utf-8"))
    assert reports[0] == reports[1] == reports[2]
    assert rejects[0] == rejects[1] == rejects[2]
    errors = [item for item in iter_dialogues(data, errors="yield") if isinstance(item, DataError)]
    assert reports[0]["rejected"] == len(errors)
    assert [json.loads(line)["error"] for line in rejects[0].splitlines()] == [str(e) for e in errors]
    assert {json.loads(line)["source"].rsplit(":", 1)[0] for line in rejects[0].splitlines()} == {str(data)}


def test_eval_split_and_packing_do_not_depend_on_chunks_or_workers(tmp_path):
    data = messy_file(tmp_path / "messy.jsonl", good=60)
    results = []
    for run, (workers, chunk) in enumerate([(1, 256), (2, 4)]):
        report = build(
            tmp_path, f"e{run}", data, num_workers=workers, chunk_size=chunk, eval_ratio=0.3, seed=3
        )
        packed = build(tmp_path, f"p{run}", data, num_workers=workers, chunk_size=chunk, packing=True)
        results.append((read_all(report.train_dir), read_all(report.eval_dir), read_all(packed.train_dir)))
    assert results[0] == results[1]
    assert results[0][1] and results[0][0]  # both splits got records


def test_first_bad_line_raises_with_file_line_and_field_from_a_worker(tmp_path):
    data = tmp_path / "bad.jsonl"
    lines = [paragraph(i) for i in range(20)]
    lines[13] = b'{"paragraph": [{"q": "x", "a": 5}]}\n'
    lines[17] = b"{broken\n"
    data.write_bytes(b"".join(lines))
    with pytest.raises(DataError) as caught:
        build(tmp_path, "out", data, num_workers=2, chunk_size=4, on_error="raise")
    assert str(caught.value).startswith(f"{data}:14: field 'paragraph[0].a': expected a string or a list")
    assert not (tmp_path / "out").exists()


class WideTemplate(CharTemplate):
    """Ids beyond 16 bits: the hand-over from the workers must not narrow them."""

    name = "char-wide"

    def build_train_sample(self, query, response, history=None):
        ids, labels = super().build_train_sample(query, response, history)
        return [i + 70_000 for i in ids], [label if label < 0 else label + 70_000 for label in labels]


def make_wide_template() -> WideTemplate:
    return WideTemplate()


def test_ids_beyond_16_bits_survive_the_hand_over(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"".join(paragraph(i) for i in range(10)))
    report = build(tmp_path, "wide", data, template_factory=make_wide_template, num_workers=2, chunk_size=3)
    records = read_all(report.train_dir)
    assert len(records) == report.samples_written > 0
    ids, labels = records[0]
    assert ids[2:7] == [c + 70_000 for c in encode("Q:问题0")]
    answer = len(encode("回答0")) + 1  # and the end-of-answer token
    assert labels[-answer:] == ids[-answer:] and set(labels[:-answer]) == {-100}
