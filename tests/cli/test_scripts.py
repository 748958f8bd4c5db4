"""The top-level scripts as a user runs them: --help, and clear failures on bad configs."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

SCRIPTS = [
    "data_utils.py",
    "train.py",
    "infer.py",
    "infer_finetuning.py",
    "infer_lora_finetuning.py",
    "infer_api.py",
]


def run(*args, timeout=120):
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_the_config_keys(script):
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
    assert "--data.max_seq_length" in result.stdout  # every script shares the task config keys


def test_misspelled_key_fails_with_its_name():
    result = run("data_utils.py", "--data.max_seq_lenght", "64")
    assert result.returncode != 0
    assert "data.max_seq_lenght" in result.stderr and "data.max_seq_length" in result.stderr


def test_missing_data_file_fails_with_its_path(tmp_path):
    config = tmp_path / "task.yaml"
    config.write_text("data:\n  train_files: [data/does_not_exist.json]\n")
    result = run("data_utils.py", "--config", str(config), "--data.output_dir", str(tmp_path / "records"))
    assert result.returncode != 0
    assert "data/does_not_exist.json" in result.stderr
    assert not (tmp_path / "records").exists()


@pytest.mark.parametrize("script", ["train.py", "infer_lora_finetuning.py"])
def test_print_config_prints_the_resolved_config(script, tmp_path):
    import yaml

    config = tmp_path / "task.yaml"
    config.write_text("method: ptv2\ngeneration:\n  max_new_tokens: 11\n")
    flags = ["--config", str(config), "--generation.top_k", "3", "--model.quantization", "nf4"]
    result = run(script, *flags, "--print_config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["method"] == "ptv2"  # from the file
    assert printed["generation"]["max_new_tokens"] == 11
    assert printed["generation"]["top_k"] == 3  # from the command line, after the file
    assert printed["model"]["quantization"] == "nf4"
    assert printed["data"]["train_files"] == ["data/train.json"]  # config/default.yaml, read first
    assert "saved" not in result.stdout and "error" not in result.stderr  # printed, nothing run


@pytest.mark.slow
def test_model_family_picks_the_chat_format(reference_dir, tmp_path):
    """`--model.family chatglm2` on a ChatGLM3 folder chats in ChatGLM2's format (auto detects ChatGLM3)."""
    import json

    from glmtune.config import build_parser, parse_args
    from glmtune.inference.artifacts import load_base

    model = str(reference_dir / "chatglm3-6b-tiny")
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps({"prompt": "你好", "completion": "?"}, ensure_ascii=False) + "\n")
    answers = {}
    for family in ("auto", "chatglm2"):
        flags = ["--model.path", model, "--model.family", family, "--generation.max_new_tokens", "8"]
        out = tmp_path / f"{family}.jsonl"
        result = run("infer.py", *flags, "--predict", str(data), "--out", str(out), timeout=300)
        assert result.returncode == 0, result.stderr
        answers[family] = json.loads(out.read_text())["prediction"]
        cfg, _ = parse_args(build_parser("test"), flags)
        engine = load_base(cfg)
        assert answers[family] == engine.chat("你好")[0]
        assert (
            type(engine.template).__name__
            == {"auto": "ChatGLM3Template", "chatglm2": "ChatGLM2Template"}[family]
        )
    assert answers["auto"] != answers["chatglm2"]
