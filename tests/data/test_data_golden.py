"""The data pipeline with the real ChatGLM tokenizers and templates, against the published goldens.

tokenizer_golden.json holds, per family, the training sample the published fine-tuning scripts build
(`train_sample`) and the prompts the published chat() builds (`chat`); the records written by build_records
must reproduce both token for token.
"""

import functools
import json
from dataclasses import fields
from pathlib import Path

import pytest

from glmtune import load_tokenizer
from glmtune.config import ConfigError, DataArgs, ModelArgs, TaskConfig
from glmtune.data.prepare import (
    NOT_BUILD_SETTINGS,
    build_settings,
    make_template,
    prepare_records,
)
from glmtune.data.records import open_reader
from glmtune.data.samples import IGNORE_INDEX
from glmtune.data.settings import BuildSettings
from glmtune.models.families import detect_family
from glmtune.tokenizers.template_choice import FAMILY_TEMPLATES, get_template
from tests.data.test_data_fakes import build_with

FOLDERS = {"v1": "chatglm-6b-tiny", "v2": "chatglm2-6b-tiny", "v3": "chatglm3-6b-tiny"}
# The reference train_sample of ChatGLM3 is its plain format; its chat() uses role tokens ("chatglm3").
GOLDEN_TRAIN_TEMPLATES = {**FAMILY_TEMPLATES, "chatglm3": "chatglm3_plain"}


@pytest.fixture(scope="module")
def golden(reference_dir):
    return json.loads((reference_dir / "tokenizer_golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizers(reference_dir):
    return {fam: load_tokenizer(reference_dir / folder) for fam, folder in FOLDERS.items()}


def family_template(reference_dir, tokenizers, fam):
    """The template data.template=auto picks for this reference folder."""
    family = detect_family(reference_dir / FOLDERS[fam])
    return get_template(FAMILY_TEMPLATES[family], tokenizers[fam])


def write_paragraphs(path: Path, dialogues: list[list[tuple[str, str]]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, turns in enumerate(dialogues):
            record = {"id": i, "paragraph": [{"q": q, "a": a} for q, a in turns]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def build(tmp_path, data, template, name="records", **kwargs) -> list[tuple[list[int], list[int]]]:
    options = dict(tokenizer_fingerprint="reference", max_seq_length=1024, progress=False, verbose=False)
    options.update(kwargs)
    report = build_with(data, out_dir=tmp_path / name, template=template, **options)
    reader = open_reader(report.train_dir)
    return [(r["input_ids"].tolist(), r["labels"].tolist()) for r in (reader[i] for i in range(len(reader)))]


def test_detected_families_and_auto_templates(reference_dir, tokenizers):
    names = {fam: family_template(reference_dir, tokenizers, fam).name for fam in FOLDERS}
    assert names == {"v1": "chatglm", "v2": "chatglm2", "v3": "chatglm3"}
    assert get_template("chatglm3", tokenizers["v3"]).chat_format  # auto trains ChatGLM3 in its chat format


@pytest.mark.parametrize("fam", ["v1", "v2", "v3"])
def test_golden_train_sample_through_build_records(tmp_path, golden, reference_dir, tokenizers, fam):
    entry = golden[fam]["train_sample"]
    data = write_paragraphs(tmp_path / "train.jsonl", [[(entry["query"], entry["response"])]])
    family = detect_family(reference_dir / FOLDERS[fam])
    template = get_template(GOLDEN_TRAIN_TEMPLATES[family], tokenizers[fam])
    assert build(tmp_path, data, template) == [(entry["input_ids"], entry["labels"])]


def test_golden_train_sample_with_worker_processes(tmp_path, golden, reference_dir):
    """Workers build their own template from the picklable factory prepare_records uses."""
    entry = golden["v2"]["train_sample"]
    data = write_paragraphs(tmp_path / "train.jsonl", [[(entry["query"], entry["response"])]] * 5)
    factory = functools.partial(make_template, str(reference_dir / FOLDERS["v2"]), "chatglm2", "chatglm2")
    records = build(tmp_path, data, None, template_factory=factory, num_workers=2, chunk_size=2)
    assert records == [(entry["input_ids"], entry["labels"])] * 5


def test_chatglm3_chat_format_sample_is_the_chat_prompt_plus_answer(tmp_path, golden, tokenizers):
    entry = golden["v3"]["train_sample"]
    chat = golden["v3"]["chat"][0]  # the published chat prompt of a first question
    data = write_paragraphs(tmp_path / "train.jsonl", [[(chat["query"], entry["response"])]])
    tok = tokenizers["v3"]
    [(ids, labels)] = build(tmp_path, data, get_template("chatglm3", tok))
    prompt = chat["ids"]
    answer = tok.encode("\n", add_special_tokens=False) + tok.encode(
        entry["response"], add_special_tokens=False
    )
    assert ids == prompt + answer + [tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * len(prompt) + answer + [tok.eos_token_id]


@pytest.mark.parametrize("fam", ["v1", "v2", "v3"])
def test_multi_turn_per_turn_prompts_are_the_golden_chat_prompts(
    tmp_path, golden, reference_dir, tokenizers, fam
):
    template = family_template(reference_dir, tokenizers, fam)
    tok = template.tokenizer
    answer = "上海有外滩。"
    entry = golden[fam]["chat"][1]  # a question with two earlier rounds
    turns = [tuple(pair) for pair in entry["history"]] + [(entry["query"], answer)]
    data = write_paragraphs(tmp_path / "train.jsonl", [turns])
    records = build(tmp_path, data, template)
    assert len(records) == len(turns)  # one sample per turn
    for k, (ids, labels) in enumerate(records):
        prompt = template.build_chat_prompt(turns[k][0], history=turns[:k]).input_ids
        if k == len(turns) - 1:
            assert prompt == entry["ids"]  # what the published chat() builds for this history
        # v1 keeps <sop> (the prompt's last token) in the labels, as the published ptuning/main.py does
        n = len(prompt) - 1 if fam == "v1" else len(prompt)
        assert ids[: len(prompt)] == prompt
        assert labels[:n] == [IGNORE_INDEX] * n and labels[n:] == ids[n:]
        assert ids[-1] == tok.eos_token_id
        supervised = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
        answer_ids = tok.encode(turns[k][1], add_special_tokens=False)
        assert supervised[-1 - len(answer_ids) : -1] == answer_ids


def supervised_runs(ids, labels) -> list[list[int]]:
    runs, run = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


@pytest.mark.parametrize("name", ["chatglm2", "chatglm3", "chatglm3_plain"])
def test_dialogue_mode_supervises_every_answer(tmp_path, golden, tokenizers, name):
    tok = tokenizers["v2" if name == "chatglm2" else "v3"]
    template = get_template(name, tok)
    entry = golden["v2"]["chat"][1]
    turns = [tuple(pair) for pair in entry["history"]] + [(entry["query"], "上海有外滩。")]
    data = write_paragraphs(tmp_path / "train.jsonl", [turns])
    [(ids, labels)] = build(tmp_path, data, template, multi_turn="dialogue")
    prompt = template.build_chat_prompt(turns[-1][0], history=turns[:-1]).input_ids
    assert ids[: len(prompt)] == prompt  # the chat prompt of the last turn, earlier answers inside it
    if name == "chatglm3":
        assert prompt == golden["v3"]["chat"][1]["ids"]
    runs = supervised_runs(ids, labels)
    assert len(runs) == len(turns)
    user, eos = tok.convert_tokens_to_ids("<|user|>"), tok.eos_token_id
    for (_, answer), run in zip(turns, runs):
        assert tok.decode(run).strip().startswith(answer)
        if name == "chatglm3":  # the metadata line, the answer, and the token that ends it
            end = eos if run is runs[-1] else user
            assert run == tok.encode("\n", add_special_tokens=False) + tok.encode(
                answer, add_special_tokens=False
            ) + [end]
    assert runs[-1][-1] == eos


def test_dialogue_mode_refused_for_chatglm_6b(tmp_path, reference_dir, tokenizers):
    template = family_template(reference_dir, tokenizers, "v1")
    data = write_paragraphs(tmp_path / "train.jsonl", [[("a", "b"), ("c", "d")]])
    with pytest.raises(ValueError, match="bidirectionally.*per_turn"):
        build(tmp_path, data, template, multi_turn="dialogue")
    assert not (tmp_path / "records").exists()


def task(reference_dir, tmp_path, folder, data, **data_options) -> TaskConfig:
    return TaskConfig(
        model=ModelArgs(path=str(reference_dir / folder)),
        data=DataArgs(
            train_files=[str(data)], output_dir=str(tmp_path / "records"), shuffle=False, **data_options
        ),
    )


def test_prepare_records_wires_the_data_config(tmp_path, reference_dir, tokenizers):
    dialogues = [[(f"问题{i}" * 10, f"回答{i}" * 5), (f"追问{i}", "好")] for i in range(40)]
    data = write_paragraphs(tmp_path / "train.jsonl", dialogues)
    cfg = task(
        reference_dir,
        tmp_path,
        FOLDERS["v3"],
        data,
        max_seq_length=40,
        truncate_side="prompt_tail",
        eval_ratio=0.25,
    )
    prepared = prepare_records(cfg, progress=False)
    report = prepared.report
    assert prepared.template_name == "chatglm3"  # auto: ChatGLM3's chat format
    assert report.settings["truncate_side"] == "prompt_tail" and report.settings["eval_ratio"] == 0.25
    assert report.eval_records > 0 and report.train_records + report.eval_records == 80
    assert report.truncated > 0
    records = []
    for split in (report.train_dir, report.eval_dir):
        reader = open_reader(split)
        records += [reader[i]["input_ids"].tolist() for i in range(len(reader))]
    # prompt_tail keeps the oldest context: each cut sample starts like the uncut one
    template = get_template("chatglm3", tokenizers["v3"])
    full = [
        template.build_train_sample(q, a, history=turns[:k]).input_ids
        for turns in dialogues
        for k, (q, a) in enumerate(turns)
    ]
    long = [ids for ids in full if len(ids) > 40]
    assert len(long) == report.truncated
    heads = {tuple(ids[:20]) for ids in records if len(ids) == 40}
    assert {tuple(ids[:20]) for ids in long} <= heads

    assert prepare_records(cfg, progress=False).report.reused


def test_prepare_records_refuses_dialogue_mode_for_chatglm_6b(tmp_path, reference_dir):
    data = write_paragraphs(tmp_path / "train.jsonl", [[("a", "b"), ("c", "d")]])
    cfg = task(reference_dir, tmp_path, FOLDERS["v1"], data, multi_turn="dialogue")
    with pytest.raises(ConfigError, match="data.multi_turn"):
        prepare_records(cfg, progress=False)


def test_data_keys_checked_where_they_become_build_settings(tmp_path, reference_dir):
    data = write_paragraphs(tmp_path / "train.jsonl", [[("a", "b")]])
    cfg = task(reference_dir, tmp_path, FOLDERS["v2"], data, eval_ratio=1.5, strategy="cut")
    with pytest.raises(ConfigError, match=r"data\.eval_ratio must be in \[0, 1\).*; data\.strategy must be"):
        prepare_records(cfg, progress=False)
    with pytest.raises(ConfigError, match="data.eval_ratio and eval_files both given"):
        build_settings(DataArgs(eval_ratio=0.1), [data], [data])


def test_every_data_key_is_a_build_setting():
    """A `data:` key the build settings do not have would silently do nothing."""
    keys = {f.name for f in fields(DataArgs)} - set(NOT_BUILD_SETTINGS)
    assert keys <= {f.name for f in fields(BuildSettings)}
