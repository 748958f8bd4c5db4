import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from glmtune.data.build import build_records, build_records_cli
from glmtune.data.readers import DataError
from glmtune.data.records import open_reader
from glmtune.data.samples import template_fingerprint
from glmtune.data.settings import BuildSettings, SettingsError
from tests.data.test_data_fakes import (
    IGNORE,
    CharTemplate,
    SystemCharTemplate,
    TurnOnlyTemplate,
    build_with,
    decode,
    make_char_template,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def write_jsonl(path: Path, n: int, start: int = 0) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(start, start + n):
            turns = [{"q": f"问题{i}", "a": f"回答{i}" * (1 + i % 5)}]
            if i % 3 == 0:
                turns.append({"q": f"追问{i}", "a": ["第一行", f"第二行{i}"]})
            f.write(json.dumps({"id": i, "paragraph": turns}, ensure_ascii=False) + "\n")
    return path


def build(tmp_path, files, **kwargs):
    options = dict(
        out_dir=tmp_path / "records",
        template=CharTemplate(),
        tokenizer_fingerprint="char-v1",
        max_seq_length=64,
        progress=False,
    )
    options.update(kwargs)
    return build_with(files, **options)


def all_records(path) -> list[tuple[list[int], list[int]]]:
    reader = open_reader(path)
    return [(r["input_ids"].tolist(), r["labels"].tolist()) for r in (reader[i] for i in range(len(reader)))]


def test_build_writes_records_and_report(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", 30)
    report = build(tmp_path, data)
    out = tmp_path / "records"
    # 30 dialogues, every third one has two turns: per_turn -> 40 samples
    assert report.dialogues_read == 30 and report.samples_built == 40 and report.samples_written == 40
    assert report.train_records == 40 and not report.reused
    assert set(report.lengths) == {"p50", "p90", "p99", "max", "mean"}
    assert report.lengths["p50"] <= report.lengths["p90"] <= report.lengths["p99"] <= report.lengths["max"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["train_records"] == 40 and saved["lengths"] == report.lengths
    records = all_records(out / "train")
    ids, labels = records[0]
    assert decode(ids) == "<g><s>Q:问题0\nA:回答0</s>"
    assert decode(i for i, label in zip(ids, labels) if label != IGNORE) == "回答0</s>"
    assert decode(records[1][0]).endswith("Q:追问0\nA:第一行\n第二行0</s>")
    printed = capsys.readouterr().out
    assert "wrote 40 train records" in printed and "no records built yet" in printed
    assert not list(tmp_path.glob(".records.tmp-*"))


def test_cache_reuse_and_rebuild_with_reasons(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", 10)
    build(tmp_path, data)
    capsys.readouterr()
    report = build(tmp_path, data, num_workers=1)
    assert report.reused and report.train_records == 14
    assert "records up to date: " in capsys.readouterr().out

    report = build(tmp_path, data, max_seq_length=32)
    assert not report.reused and report.reasons == ["max_seq_length: 64 -> 32"]
    assert "max_seq_length: 64 -> 32" in capsys.readouterr().out

    report = build(tmp_path, data, max_seq_length=32, tokenizer_fingerprint="char-v2")
    assert report.reasons == ["tokenizer: 'char-v1' -> 'char-v2'"]

    # Same size and mtime, different content: still noticed (content hash).
    stat = data.stat()
    text = data.read_text(encoding="utf-8").replace("回答1", "答复1", 1)
    data.write_text(text, encoding="utf-8")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    report = build(tmp_path, data, max_seq_length=32, tokenizer_fingerprint="char-v2")
    assert report.reasons == [f"train file {data} changed"]

    report = build(tmp_path, data, max_seq_length=32, tokenizer_fingerprint="char-v2", force=True)
    assert report.reasons == ["force=True"]


class ChatCharTemplate(CharTemplate):
    """With a chat prompt for inference, as the real templates have."""

    name = "char-test-chat"

    def build_chat_prompt(self, query, history=None, system=None):
        from glmtune.tokenizers.prompts import ChatPrompt

        text = self.prompt(query, history)
        return ChatPrompt(text, [1, 2, *(ord(c) for c in text)])


def test_editing_what_the_template_renders_rebuilds(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", 10)
    first = build(tmp_path, data, template=ChatCharTemplate())
    assert not first.reused
    assert build(tmp_path, data, template=ChatCharTemplate()).reused  # same code, same name: reused

    # The training sample changes (same name, same tokenizer): rebuilt, and the records follow the new code.
    original = CharTemplate.prompt
    monkeypatch.setattr(
        CharTemplate, "prompt", lambda self, q, h=None: original(self, q, h).replace("Q:", "U:")
    )
    report = build(tmp_path, data, template=ChatCharTemplate())
    assert not report.reused and [r.split(":")[0] for r in report.reasons] == ["template_rendering"]
    assert decode(all_records(tmp_path / "records" / "train")[0][0]).startswith("<g><s>U:")
    assert build(tmp_path, data, template=ChatCharTemplate()).reused

    # Only the chat prompt changes (what inference shows the model): noticed too.
    chat = ChatCharTemplate.build_chat_prompt
    monkeypatch.setattr(
        ChatCharTemplate,
        "build_chat_prompt",
        lambda self, *a, **k: chat(self, *a, **k)._replace(input_ids=[1]),
    )
    report = build(tmp_path, data, template=ChatCharTemplate())
    assert not report.reused and [r.split(":")[0] for r in report.reasons] == ["template_rendering"]


def test_the_template_probe_renders_history_and_system(monkeypatch):
    """A change that shows only in a later turn's history, or only with a system prompt, changes the key."""
    before = template_fingerprint(SystemCharTemplate(), "per_turn")
    original = CharTemplate.prompt
    monkeypatch.setattr(
        CharTemplate,
        "prompt",
        lambda self, q, h=None: original(self, q, h).replace("\nA:", "\nB:", 1 if h else 0),
    )
    history_only = template_fingerprint(SystemCharTemplate(), "per_turn")
    assert history_only != before
    monkeypatch.undo()
    parent = SystemCharTemplate.build_train_sample
    monkeypatch.setattr(
        SystemCharTemplate,
        "build_train_sample",
        lambda self, q, r, history=None, system=None: parent(self, q, r, history, system and system.upper()),
    )
    assert template_fingerprint(SystemCharTemplate(), "per_turn") != before
    assert template_fingerprint(SystemCharTemplate(), "dialogue") != template_fingerprint(
        SystemCharTemplate(), "per_turn"
    )


def test_workers_give_the_same_records_in_order(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", 200)
    one = build(tmp_path, data, out_dir=tmp_path / "one", chunk_size=7)
    two = build(
        tmp_path,
        data,
        out_dir=tmp_path / "two",
        template=None,
        template_factory=make_char_template,
        num_workers=2,
        chunk_size=7,
    )
    assert one.train_records == two.train_records > 200
    assert all_records(tmp_path / "one" / "train") == all_records(tmp_path / "two" / "train")


@pytest.mark.parametrize("backend", ["record", "lmdb"])
def test_multi_turn_dialogue_mode_and_backends(tmp_path, backend):
    data = write_jsonl(tmp_path / "train.jsonl", 9)
    report = build(tmp_path, data, multi_turn="dialogue", backend=backend)
    assert report.samples_built == 9 and report.train_records == 9
    ids, labels = all_records(tmp_path / "records" / "train")[0]
    assert decode(i for i, label in zip(ids, labels) if label != IGNORE) == "回答0</s>第一行\n第二行0</s>"
    with pytest.raises(TypeError, match="build_dialogue_sample"):
        build(tmp_path, data, multi_turn="dialogue", template=TurnOnlyTemplate(), out_dir=tmp_path / "x")


@pytest.mark.parametrize(
    "strategy, expect", [("truncate", "truncated"), ("slide", "split"), ("drop", "dropped")]
)
def test_strategies_counted(tmp_path, strategy, expect):
    data = tmp_path / "long.jsonl"
    rows = [{"prompt": "p" * 50, "completion": "a" * 50}, {"prompt": "short", "completion": "ok"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = build(tmp_path, data, max_seq_length=40, strategy=strategy, stride=20)
    assert getattr(report, {"truncated": "truncated", "split": "split", "dropped": "dropped"}[expect]) == 1
    lengths = [len(ids) for ids, _ in all_records(tmp_path / "records" / "train")]
    assert all(n <= 40 for n in lengths)
    if strategy == "slide":
        assert report.windows >= 2 and report.train_records == report.windows + 1
    if strategy == "drop":
        assert report.train_records == 1


def test_packing_build(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", 40)
    plain = build(tmp_path, data, out_dir=tmp_path / "plain")
    packed = build(tmp_path, data, out_dir=tmp_path / "packed", packing=True, max_seq_length=64)
    assert packed.samples_written == plain.train_records
    assert packed.train_records < plain.train_records / 2
    assert packed.train_tokens == plain.train_tokens
    reader = open_reader(tmp_path / "packed" / "train")
    record = reader[0]
    assert set(record) == {"input_ids", "labels", "position_ids", "seq_ids"}
    assert len(record["input_ids"]) <= 64 and record["seq_ids"].max() >= 2
    assert packed.reasons == ["no records built yet"]


def test_shuffle_and_eval_ratio(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", 60)
    plain = all_records(build(tmp_path, data, out_dir=tmp_path / "plain").train_dir)
    report = build(tmp_path, data, shuffle=True, seed=3, eval_ratio=0.2)
    train = all_records(tmp_path / "records" / "train")
    evals = all_records(tmp_path / "records" / "eval")
    assert report.eval_records == len(evals) > 0 and report.train_records == len(train)
    assert sorted(train + evals) == sorted(plain)
    assert train != sorted(train, key=plain.index)  # shuffled reading order
    again = build(tmp_path, data, shuffle=True, seed=3, eval_ratio=0.2, out_dir=tmp_path / "again")
    assert all_records(again.train_dir) == train


def test_eval_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", 10)
    dev = write_jsonl(tmp_path / "dev.jsonl", 4, start=100)
    report = build(tmp_path, train, eval_files=[dev])
    assert report.train_records == 14 and report.eval_records == 5
    assert report.eval_dir is not None


def test_bad_record_raises_and_writes_nothing(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", 5)
    with open(data, "a", encoding="utf-8") as f:
        f.write('{"paragraph": [{"q": "x", "a": ""}]}\n')
    with pytest.raises(DataError, match=rf"{data}:6: field 'paragraph\[0\]\.a': empty answer"):
        build(tmp_path, data)
    assert not (tmp_path / "records").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".records")] == [".records.lock"]
    # the CLI wrapper: exit status 1 and the message on stderr
    settings = BuildSettings(data, out_dir=tmp_path / "records", max_seq_length=64)
    assert (
        build_records_cli(settings, template=CharTemplate(), tokenizer_fingerprint="c", progress=False) == 1
    )


def test_previous_records_survive_a_failed_rebuild(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", 5)
    build(tmp_path, data)
    before = all_records(tmp_path / "records" / "train")
    with open(data, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match=rf"{data}:6: invalid JSON"):
        build(tmp_path, data)
    assert all_records(tmp_path / "records" / "train") == before


def test_on_error_skip_writes_rejects(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", 5)
    with open(data, "ab") as f:
        f.write(b'{"paragraph": [{"q": 1, "a": "x"}]}\nnot json\n{"paragraph": [{"q": "\xff", "a": "x"}]}\n')
    write_jsonl(tmp_path / "more.jsonl", 2, start=10)
    report = build(tmp_path, [data, tmp_path / "more.jsonl"], on_error="skip")
    assert report.rejected == 3 and report.dialogues_read == 7 and report.train_records == 9
    rejects = [json.loads(line) for line in (tmp_path / "records" / "rejects.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rejects] == [f"{data}:6", f"{data}:7", f"{data}:8"]
    assert rejects[0]["field"] == "paragraph[0].q" and rejects[1]["record"] == "not json"
    assert "skipped 3 bad records" in capsys.readouterr().out


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", 2)
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a glmtune records folder"):
        build(tmp_path, data)
    assert (tmp_path / "records" / "precious.txt").read_text() == "keep me"


def test_setting_problems_reported_together(tmp_path):
    with pytest.raises(SettingsError, match="on_error.*eval_ratio.*not found.*stride"):
        BuildSettings(
            tmp_path / "missing.jsonl",
            out_dir=tmp_path / "r",
            max_seq_length=8,
            on_error="ignore",
            eval_ratio=1.5,
            strategy="slide",
            stride=9,
        )
    data = write_jsonl(tmp_path / "train.jsonl", 2)
    with pytest.raises(TypeError, match="exactly one of template"):
        build_records(
            BuildSettings(data, out_dir=tmp_path / "r", max_seq_length=8), tokenizer_fingerprint="x"
        )


KILL_SCRIPT = """
import sys
sys.path.insert(0, {here!r})
from tests.data.test_data_fakes import CharTemplate
from glmtune.data.build import build_records
from glmtune.data.settings import BuildSettings
settings = BuildSettings({data!r}, out_dir={out!r}, max_seq_length=64, chunk_size=16)
build_records(settings, template=CharTemplate(), tokenizer_fingerprint="char", progress=False)
"""


@pytest.mark.slow
def test_sigkill_mid_build_leaves_nothing_half_written(tmp_path):
    data = write_jsonl(tmp_path / "big.jsonl", 80_000)
    out = tmp_path / "records"
    script = KILL_SCRIPT.format(here=str(HERE), data=str(data), out=str(out))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 60
    # Wait until it is writing records into its temp folder, then kill it hard.
    while time.monotonic() < deadline:
        partial = list(tmp_path.glob(".records.tmp-*/train/data.bin"))
        if partial and partial[0].stat().st_size > 100_000:
            break
        assert proc.poll() is None, "the build finished before it could be killed; use a bigger file"
        time.sleep(0.05)
    else:
        pytest.fail("the build never started writing")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing where training reads
    assert list(tmp_path.glob(".records.tmp-*"))  # the half-written folder is beside it

    report = build(tmp_path, data, template=CharTemplate(), tokenizer_fingerprint="char", chunk_size=16)
    assert not list(tmp_path.glob(".records.tmp-*"))  # cleaned up
    assert report.dialogues_read == 80_000 and report.train_records == 106_667
    reader = open_reader(out / "train")
    assert len(reader) == 106_667
    assert decode(reader[106_666]["input_ids"]).endswith("Q:问题79999\nA:" + "回答79999" * 5 + "</s>")
    assert np.all(reader.lengths > 0)


def test_build_streams_instead_of_holding_the_data(tmp_path):
    data = tmp_path / "big.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(2000):  # a big ignored field: a big file, cheap to tokenize
            record = {"input": f"q{i}", "target": "答" * 20, "notes": "注" * 3000}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    size = data.stat().st_size
    tracemalloc.start()
    report = build(tmp_path, data, max_seq_length=32, verbose=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report.train_records == 2000
    assert peak < size / 20, f"peak {peak} bytes while building from a {size}-byte file"
