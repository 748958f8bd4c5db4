"""`python data_utils.py` on bad input: exit status 1 with FILE:LINE and the field, or skip with rejects."""

import importlib.util
import json
import re
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


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ inputs with no records


def empty_inputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n  \n")
    (tmp_path / "array.json").write_text(" [ ]\n")
    (tmp_path / "folder").mkdir()
    return {name: tmp_path / name for name in ("empty.jsonl", "blank.jsonl", "array.json", "folder")}


@pytest.mark.parametrize("script", ["data_utils.py", "train.py"])
@pytest.mark.parametrize("name", ["empty.jsonl", "blank.jsonl", "array.json", "folder"])
def test_an_input_with_no_records_is_an_error_naming_it(reference_dir, tmp_path, capsys, script, name):
    data = empty_inputs(tmp_path)[name]
    out = tmp_path / "records"
    flags = argv(reference_dir, data, out, "--train.output_dir", str(tmp_path / "run"))
    if script == "data_utils.py":
        flags = flags[:-2]
    assert load_script(script).main(flags) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]  # beside the progress bar
    assert len(errors) == 1 and errors[0].startswith("error: ") and str(data) in errors[0]
    assert err.rstrip().endswith(errors[0]) and "Traceback" not in err
    assert not out.exists()


def test_an_empty_eval_file_is_named_too(data_utils, reference_dir, tmp_path, capsys):
    train = write_lines(tmp_path / "train.jsonl", [GOOD, GOOD])
    empty = empty_inputs(tmp_path)["array.json"]
    flags = argv(reference_dir, train, tmp_path / "records")
    flags[flags.index("--data.eval_files") + 1] = json.dumps([str(empty)])
    assert data_utils.main(flags) == 1
    assert str(empty) in capsys.readouterr().err


def test_a_file_whose_every_sample_is_dropped_is_an_error(data_utils, reference_dir, tmp_path, capsys):
    data = write_lines(tmp_path / "train.jsonl", [GOOD, GOOD])
    flags = argv(
        reference_dir, data, tmp_path / "records", "--data.strategy", "drop", "--data.max_seq_length", "8"
    )
    assert data_utils.main(flags) == 1
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: ") and str(data) in error and "2 samples dropped" in error


def test_a_max_seq_length_with_no_room_for_an_answer_is_an_error(data_utils, reference_dir, tmp_path, capsys):
    """ChatGLM2 prompts keep `[gMASK] sop` and their answer header `\n\n答：`: 6 tokens."""
    data = write_lines(tmp_path / "train.jsonl", [GOOD])
    assert data_utils.main(argv(reference_dir, data, tmp_path / "records", "--data.max_seq_length", "6")) == 1
    [error] = capsys.readouterr().err.splitlines()
    assert error.startswith("error: data.max_seq_length=6 leaves no room for an answer")


# ------------------------------------------------------------------------------------------------ --inspect


def inspect_rows(printed: str) -> list[list[tuple[str, int, int]]]:
    """The tables printed by --inspect: per sample, (token text, id, label) rows."""
    samples: list[list[tuple[str, int, int]]] = []
    for line in printed.splitlines():
        if line.startswith("sample "):
            samples.append([])
        elif samples and (row := re.fullmatch(r"\s*(.+?)\s+(\d+) ->\s+(-?\d+)", line)):
            samples[-1].append((row[1], int(row[2]), int(row[3])))
    return samples


def test_inspect_prints_token_id_label_of_the_first_samples(data_utils, reference_dir, tmp_path, capsys):
    from glmtune.models.loading import load_tokenizer
    from glmtune.tokenizers.template_choice import get_template

    pairs = [
        ("一斤等于多少克？", "五百克。"),
        ("乌龙茶适合什么水温？", "用一百度的沸水。"),
        ("你好", "你好！"),
    ]
    lines = [json.dumps({"prompt": q, "completion": a}, ensure_ascii=False).encode() for q, a in pairs]
    data = write_lines(tmp_path / "train.jsonl", lines)
    model = reference_dir / "chatglm3-6b-tiny"
    flags = argv(reference_dir, data, tmp_path / "records", "--inspect", "2")
    flags[flags.index("--model.path") + 1] = str(model)
    assert data_utils.main(flags) == 0
    shown = inspect_rows(capsys.readouterr().out)

    tokenizer = load_tokenizer(model, family="chatglm3")
    template = get_template("chatglm3", tokenizer)
    assert len(shown) == 2  # the first N, no more
    for rows, (query, answer) in zip(shown, pairs, strict=False):
        ids, labels = template.build_train_sample(query, answer)
        assert [(i, label) for _, i, label in rows] == list(zip(ids, labels, strict=True))
        assert [text for text, _, _ in rows] == [
            repr(tokenizer.decode([i]) or tokenizer.convert_ids_to_tokens(i)) for i in ids
        ]
        assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
        at = ids.index(assistant)
        assert rows[at] == ("'<|assistant|>'", assistant, -100)  # the prompt carries no loss
        assert all(label == -100 for _, _, label in rows[:at])
        assert all(label == i for _, i, label in rows[at + 1 :])  # the answer and </s> do

    # Built records are read back, not rebuilt.
    assert data_utils.main([*flags[:-1], "1"]) == 0
    printed = capsys.readouterr().out
    assert "records up to date" in printed and len(inspect_rows(printed)) == 1


def test_inspect_splits_packed_records_into_their_samples(data_utils, reference_dir, tmp_path, capsys):
    data = write_lines(tmp_path / "train.jsonl", [GOOD] * 3)
    flags = argv(reference_dir, data, tmp_path / "records", "--data.packing", "true", "--inspect", "3")
    assert data_utils.main(flags) == 0
    printed = capsys.readouterr().out
    shown = inspect_rows(printed)
    assert len(shown) == 3 and "(record 0)" in printed.split("sample 3")[1].splitlines()[0]
    assert shown[0][1:] == shown[1][1:] == shown[2][1:]  # the same sample three times in one record
    assert all(rows[0][2] == -100 for rows in shown)


def test_inspect_refuses_a_negative_count(data_utils, reference_dir, tmp_path, capsys):
    data = write_lines(tmp_path / "train.jsonl", [GOOD])
    assert data_utils.main(argv(reference_dir, data, tmp_path / "records", "--inspect", "-1")) == 1
    assert capsys.readouterr().err.startswith("error: --inspect")


def test_editing_a_template_rebuilds_the_records(data_utils, reference_dir, tmp_path, monkeypatch, capsys):
    from glmtune.tokenizers.prompts import ChatGLM2Template

    data = write_lines(tmp_path / "train.jsonl", [GOOD])
    flags = argv(reference_dir, data, tmp_path / "records", "--inspect", "1")
    assert data_utils.main(flags) == 0
    before = inspect_rows(capsys.readouterr().out)
    assert data_utils.main(flags) == 0
    assert "records up to date" in capsys.readouterr().out

    parts = ChatGLM2Template.prompt_parts
    monkeypatch.setattr(
        ChatGLM2Template,
        "prompt_parts",
        lambda self, *a, **k: [(text.replace("问：", "Q: "), s) for text, s in parts(self, *a, **k)],
    )
    assert data_utils.main(flags) == 0
    printed = capsys.readouterr().out
    assert "building records in" in printed and "template_rendering" in printed
    assert inspect_rows(printed) != before  # the records follow the edited template


@pytest.mark.parametrize("side", ["prompt_head", "prompt_tail"])
def test_truncated_chatglm3_prompts_keep_their_role_tokens(data_utils, reference_dir, tmp_path, side):
    """A prompt cut to fit keeps `[gMASK] sop` first and `<|assistant|>` right before the answer."""
    from glmtune.data.records import open_reader
    from glmtune.models.loading import load_tokenizer

    long_query = "请详细介绍一下乌龙茶、绿茶和红茶的区别，" * 4
    line = json.dumps({"prompt": long_query, "completion": "乌龙茶半发酵。"}, ensure_ascii=False).encode()
    data = write_lines(tmp_path / "train.jsonl", [line])
    model = reference_dir / "chatglm3-6b-tiny"
    out = tmp_path / "records"
    flags = argv(reference_dir, data, out, "--data.max_seq_length", "24", "--data.truncate_side", side)
    flags[flags.index("--model.path") + 1] = str(model)
    assert data_utils.main(flags) == 0
    tokenizer = load_tokenizer(model, family="chatglm3")
    [gmask, sop, assistant] = tokenizer.convert_tokens_to_ids(["[gMASK]", "sop", "<|assistant|>"])
    record = open_reader(out / "train")[0]
    ids, labels = record["input_ids"].tolist(), record["labels"].tolist()
    assert len(ids) == 24 and ids[:2] == [gmask, sop]
    first_label = next(i for i, label in enumerate(labels) if label != -100)
    assert ids[first_label - 1] == assistant and ids.count(assistant) == 1
    answer = [i for i in labels if i != -100]
    assert tokenizer.decode(answer[:-1]).strip() == "乌龙茶半发酵。" and answer[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    "template, header",
    [
        ("chatglm2", "\n\n答："),
        ("llama2", "[/INST]"),
        ("chatml", "<|im_start|>assistant\n"),
        ("alpaca", "### Response:\n"),
    ],
)
def test_prompt_tail_truncation_keeps_the_answer_header(
    data_utils, reference_dir, tmp_path, template, header
):
    """Cutting the end of a long prompt still leaves the text every prompt ends with before the answer."""
    from glmtune.data.records import open_reader
    from glmtune.models.loading import load_tokenizer

    line = json.dumps(
        {"prompt": "请详细介绍一下乌龙茶、绿茶和红茶的区别，" * 6, "completion": "好的。"}, ensure_ascii=False
    )
    data = write_lines(tmp_path / "train.jsonl", [line.encode()])
    out = tmp_path / "records"
    flags = [
        "--data.max_seq_length",
        "48",
        "--data.truncate_side",
        "prompt_tail",
        "--data.template",
        template,
    ]
    assert data_utils.main(argv(reference_dir, data, out, *flags)) == 0
    record = open_reader(out / "train")[0]
    ids, labels = record["input_ids"].tolist(), record["labels"].tolist()
    first_label = next(i for i, label in enumerate(labels) if label != -100)
    tokenizer = load_tokenizer(reference_dir / "chatglm2-6b-tiny", family="chatglm2")
    assert len(ids) == 48 and tokenizer.decode(ids[:first_label]).endswith(header)
    assert "请详细介绍" in tokenizer.decode(ids[:first_label])  # the prompt's start was kept


def test_chatglm_6b_prompt_tail_truncation_keeps_the_answer_header_after_history(
    data_utils, reference_dir, tmp_path
):
    from glmtune.data.records import open_reader
    from glmtune.models.loading import load_tokenizer

    turns = [
        {"q": "你好", "a": "你好！"},
        {"q": "请详细介绍一下乌龙茶、绿茶和红茶的区别，" * 6, "a": "好的。"},
    ]
    data = write_lines(
        tmp_path / "train.jsonl", [json.dumps({"paragraph": turns}, ensure_ascii=False).encode()]
    )
    model = reference_dir / "chatglm-6b-tiny"
    out = tmp_path / "records"
    flags = argv(
        reference_dir, data, out, "--data.max_seq_length", "48", "--data.truncate_side", "prompt_tail"
    )
    flags[flags.index("--model.path") + 1] = str(model)
    assert data_utils.main([*flags, "--data.shuffle", "false"]) == 0
    ids, labels = (open_reader(out / "train")[1][key].tolist() for key in ("input_ids", "labels"))
    first_label = next(i for i, label in enumerate(labels) if label != -100)
    prompt = load_tokenizer(model, family="chatglm").decode(ids[:first_label])
    assert (
        len(ids) == 48 and prompt.startswith("[Round 0]") and re.search(r"\n答[:：]\[gMASK\]$", prompt)
    )  # its tokenizer writes "：" as ":"
