"""The embedded default is built in its own folder only: anywhere else a missing checkpoint is an error."""

import subprocess
import sys
from pathlib import Path

import pytest

import glmtune.demo.tiny as tiny
from glmtune.config import ConfigError, TinyModelArgs
from tests.conftest import REPO_ROOT

SMALL = TinyModelArgs(
    num_layers=1, hidden_size=32, num_attention_heads=2, multi_query_group_num=1, kv_channels=16,
    ffn_hidden_size=64, vocab_size=800, texts=[str(REPO_ROOT / "data" / "train.json")],
)  # fmt: skip


def test_the_default_folder_is_built_on_first_use(tmp_path: Path, monkeypatch) -> None:
    default = tmp_path / "output" / "tiny-chatglm2"
    monkeypatch.setattr(tiny, "TINY_MODEL_PATH", str(default))
    assert tiny.ensure_model(default, SMALL) == default
    assert (default / "config.json").is_file() and (default / "tokenizer.model").is_file()


@pytest.mark.parametrize("exists", [False, True])
def test_any_other_missing_checkpoint_is_an_error_naming_the_path(tmp_path: Path, exists: bool) -> None:
    typo = tmp_path / "output" / "tiny-chatglm"
    if exists:
        typo.mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"model.path: {typo} (holds no checkpoint|does not exist)"):
        tiny.ensure_model(typo, SMALL)
    assert not (typo / "config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "infer.py"])
def test_scripts_refuse_a_model_path_typo(tmp_path: Path, script: str) -> None:
    typo = tmp_path / "tiny-chatglm"
    result = subprocess.run(
        [sys.executable, script, "--model.path", str(typo), "--train.output_dir", str(tmp_path / "run"),
         "--data.output_dir", str(tmp_path / "records")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-1000:] + result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: model.path: {typo} does not exist"
    assert "Traceback" not in result.stderr and not typo.exists()
