"""The top-level scripts as a user runs them: --help, and clear failures on bad configs."""

import subprocess
import sys

import pytest

from glmtune.config import REPO_ROOT

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
