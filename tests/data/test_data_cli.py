"""`python data_utils.py` on bad input: exit status 1 with FILE:LINE and the field, or skip with rejects."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_utils():
    spec = importlib.util.spec_from_file_location("data_utils", REPO / "data_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def argv(reference_dir, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model.path",
        str(reference_dir / "chatglm2-6b-tiny"),
        "--data.train_files",
        json.dumps([str(data)]),
        "--data.eval_files",
        "[]",
        "--data.output_dir",
        str(out),
        *extra,
    ]


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


GOOD = json.dumps({"paragraph": [{"q": "你好", "a": "你好！"}]}, ensure_ascii=False).encode()
BAD = {
    "invalid JSON": (b'{"paragraph": [', None),
    "missing": (b'{"paragraph": [{"q": "x"}]}', "paragraph[0].a"),
    "expected str": (b'{"paragraph": [{"q": 1, "a": "x"}]}', "paragraph[0].q"),
    "empty answer": (b'{"paragraph": [{"q": "x", "a": " "}]}', "paragraph[0].a"),
    "not UTF-8": (b'{"paragraph": [{"q": "\xff", "a": "x"}]}', None),
}


@pytest.mark.parametrize("message", list(BAD))
def test_bad_line_exits_non_zero_with_file_line_and_field(
    data_utils, reference_dir, tmp_path, capsys, message
):
    line, field = BAD[message]
    data = write_lines(tmp_path / "train.jsonl", [GOOD, GOOD, line, GOOD])
    out = tmp_path / "records"
    assert data_utils.main(argv(reference_dir, data, out)) == 1
    err = capsys.readouterr().err
    assert f"{data}:3" in err and message in err
    if field:
        assert f"field {field!r}" in err
    assert not out.exists()  # nothing half-written where training reads


def test_on_error_skip_counts_and_saves_the_bad_lines(data_utils, reference_dir, tmp_path, capsys):
    lines = [GOOD] + [line for line, _ in BAD.values()] + [GOOD]
    data = write_lines(tmp_path / "train.jsonl", lines)
    out = tmp_path / "records"
    assert data_utils.main(argv(reference_dir, data, out, "--data.on_error", "skip")) == 0
    printed = capsys.readouterr().out
    assert f"skipped {len(BAD)} bad records" in printed and "records: 2 train" in printed
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["source"] for r in rejects] == [f"{data}:{i}" for i in range(2, 2 + len(BAD))]
    assert json.loads((out / "report.json").read_text())["rejected"] == len(BAD)
