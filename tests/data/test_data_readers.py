import json
import tracemalloc
from pathlib import Path

import pytest

from glmtune.data.readers import DataError, Dialogue, detect_format, iter_dialogues, read_dialogues


def write_jsonl(path: Path, records: list, bom: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def write_array(path: Path, records: list, bom: bool = False) -> Path:
    text = json.dumps(records, ensure_ascii=False, indent=2)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


PARAGRAPH = {
    "id": 0,
    "paragraph": [
        {"q": "你好", "a": "我是机器人"},
        {"q": "从南京到上海的路线", "a": ["路线如下：", "1. 地铁", "2. 高铁"]},
    ],
}


# ---------------------------------------------------------------------------------------------- formats


def test_paragraph_multi_turn_and_list_answer(tmp_path):
    [d] = read_dialogues(write_jsonl(tmp_path / "p.jsonl", [PARAGRAPH]))
    assert d.turns == [("你好", "我是机器人"), ("从南京到上海的路线", "路线如下：\n1. 地铁\n2. 高铁")]
    assert d.system is None
    assert d.source == f"{tmp_path / 'p.jsonl'}:1"
    assert d.meta == {"id": 0}


def test_prompt_completion(tmp_path):
    path = write_jsonl(tmp_path / "pc.json", [{"prompt": "你是谁？", "completion": "不告诉你。"}])
    assert read_dialogues(path) == [Dialogue([("你是谁？", "不告诉你。")], source=f"{path}:1")]


def test_alpaca_input_history_system(tmp_path):
    records = [
        {"instruction": "翻译", "input": "hello", "output": "你好"},
        {"instruction": "讲个笑话", "input": "", "output": "哈哈"},
        {"instruction": "继续", "output": "好的", "history": [["第一问", "第一答"]], "system": "你是助手"},
    ]
    d1, d2, d3 = read_dialogues(write_jsonl(tmp_path / "a.jsonl", records))
    assert d1.turns == [("翻译\nhello", "你好")]
    assert d2.turns == [("讲个笑话", "哈哈")]
    assert d3.turns == [("第一问", "第一答"), ("继续", "好的")]
    assert d3.system == "你是助手"


def test_conversations_sharegpt_and_messages(tmp_path):
    records = [
        {
            "conversations": [
                {"from": "system", "value": "be brief"},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
                {"from": "human", "value": "bye"},
                {"from": "gpt", "value": "ciao"},
            ]
        },
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    ]
    d1, d2 = read_dialogues(write_jsonl(tmp_path / "c.jsonl", records))
    assert d1.system == "be brief" and d1.turns == [("hi", "hello"), ("bye", "ciao")]
    assert d2.system is None and d2.turns == [("2+2?", "4")]


def test_input_target_ignores_extra_fields(tmp_path):
    record = {"input": "病人头痛，诊断？", "target": "偏头痛", "answer_choices": ["a"], "task_type": "cls"}
    [d] = read_dialogues(write_jsonl(tmp_path / "cblue.json", [record]))
    assert d.turns == [("病人头痛，诊断？", "偏头痛")]


def test_detect_format_and_explicit_format(tmp_path):
    assert detect_format({"instruction": "x", "input": "", "output": "y"}) == "alpaca"
    assert detect_format({"input": "x", "target": "y"}) == "input_target"
    assert detect_format({"messages": []}) == "conversations"
    assert detect_format({"foo": 1}) is None
    path = write_jsonl(tmp_path / "x.jsonl", [{"input": "q", "target": "a"}])
    assert read_dialogues(path, format="input_target")[0].turns == [("q", "a")]
    with pytest.raises(DataError, match=r"x\.jsonl:1: field 'prompt': missing"):
        read_dialogues(path, format="prompt_completion")
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=r"u\.jsonl:1: cannot tell the data format"):
        read_dialogues(unknown)


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_jsonl_and_array_with_and_without_bom(tmp_path, layout, bom):
    records = [PARAGRAPH, {"id": 1, "paragraph": [{"q": "q2", "a": "a2"}]}]
    writer = write_jsonl if layout == "jsonl" else write_array
    path = writer(tmp_path / f"data.{layout}", records, bom=bom)
    d1, d2 = read_dialogues(path)
    assert d1.turns[0] == ("你好", "我是机器人")
    assert d2.turns == [("q2", "a2")]
    if layout == "jsonl":
        assert (d1.source, d2.source) == (f"{path}:1", f"{path}:2")
    else:  # the line where each array element starts
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        assert lines[int(d2.source.rsplit(":", 1)[1]) - 1] == "  {"
        assert int(d2.source.rsplit(":", 1)[1]) > int(d1.source.rsplit(":", 1)[1]) > 1


def test_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\r\n\r\n{"prompt": "c", "completion": "d"}\r\n')
    d1, d2 = read_dialogues(path)
    assert d2.turns == [("c", "d")] and d2.source.endswith(":3")


def test_empty_array(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[ ]\n")
    assert read_dialogues(path) == []


# ------------------------------------------------------------------------------------------- bad input


BAD_CASES = [
    ('{"prompt": "a", "completion": "b"', None, "invalid JSON"),
    ('{"prompt": "a"}', "completion", "missing"),
    ('{"prompt": 3, "completion": "b"}', "prompt", "expected str, got int"),
    ('{"prompt": "a", "completion": "  "}', "completion", "empty answer"),
    ('{"paragraph": [{"q": "a", "a": ["x", 1]}]}', "paragraph[0].a", "list of strings"),
    ('{"paragraph": [{"q": "a"}]}', "paragraph[0].a", "missing"),
    ('{"paragraph": {"q": "a"}}', "paragraph", "expected list"),
    ('{"instruction": "a", "output": "b", "history": [["x"]]}', "history[0]", "pair"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "messages", "last message"),
    ('{"conversations": [{"from": "bot", "value": "a"}]}', "conversations[0].from", "unknown role"),
    ('{"input": "a", "target": ""}', "target", "empty answer"),
    ("[1, 2]", None, "expected a JSON object"),
]


@pytest.mark.parametrize("line, field, message", BAD_CASES)
def test_bad_record_raises_with_file_line_and_field(tmp_path, line, field, message):
    path = tmp_path / "bad.jsonl"
    good = (
        '{"prompt": "a", "completion": "b"}'
        if "paragraph" not in line
        else '{"paragraph": [{"q": "a", "a": "b"}]}'
    )
    if "instruction" in line:
        good = '{"instruction": "a", "output": "b"}'
    if "messages" in line or "conversations" in line:
        good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    if "target" in line:
        good = '{"input": "a", "target": "b"}'
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_dialogues(path)
    error = info.value
    assert f"{path}:3" in str(error) and error.source == f"{path}:3"
    assert message in str(error)
    if field:
        assert f"'{field}'" in str(error) and error.field == field


def test_non_utf8_jsonl(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 \(byte 0xe9"):
        read_dialogues(path)


def test_non_utf8_array_element_reports_its_line(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(
        b'[\n{"prompt": "a", "completion": "b"},\n{"prompt": "caf\xe9",\n "completion": "b"}\n]\n'
    )
    with pytest.raises(DataError, match=rf"{path}:3: not UTF-8 \(element 1\)"):
        read_dialogues(path)


def test_array_bad_element_reports_line_and_index(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a",\n   "completion": 5}\n]\n')
    with pytest.raises(DataError, match=rf"{path}:3: field 'completion'"):
        read_dialogues(path)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "c"}\n]\n')
    with pytest.raises(DataError, match=rf"{broken}:3: invalid JSON in element 1"):
        read_dialogues(broken)


def test_errors_yield_keeps_reading(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"prompt": "a", "completion": "b"}\nnot json\n{"prompt": "\xff"}\n{"prompt": "c", "completion": "d"}\n'
    )
    items = list(iter_dialogues(path, errors="yield"))
    assert [type(i).__name__ for i in items] == ["Dialogue", "DataError", "DataError", "Dialogue"]
    assert items[1].source == f"{path}:2" and items[1].raw == "not json"
    assert items[2].source == f"{path}:3"


# ---------------------------------------------------------------------------------------------- streaming


def test_jsonl_is_streamed_not_loaded_whole(tmp_path):
    path = tmp_path / "big.jsonl"
    answer = "答" * 2000
    with open(path, "w", encoding="utf-8") as f:
        for i in range(3000):
            f.write(json.dumps({"prompt": f"q{i}", "completion": answer}, ensure_ascii=False) + "\n")
    size = path.stat().st_size
    assert size > 15_000_000
    tracemalloc.start()
    count = sum(1 for _ in iter_dialogues(path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 3000
    assert peak < size / 50, f"peak {peak} bytes while reading a {size}-byte file"


def test_pretty_printed_record_in_json_lines_gets_a_hint(tmp_path):
    path = tmp_path / "pretty.json"
    path.write_text('{\n  "prompt": "a",\n  "completion": "b"\n}\n')
    with pytest.raises(
        DataError, match=rf"{path}:1: invalid JSON.*pretty-printed records go in a JSON array"
    ):
        read_dialogues(path)
