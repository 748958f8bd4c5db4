"""The task config: defaults, overrides, unknown keys, missing files, and every shipped config parses."""

from pathlib import Path

import pytest

from glmtune.config import ConfigError, TaskConfig, build_parser, check_data_files, parse_args
from tests.conftest import REPO_ROOT

CONFIGS = sorted(p for p in (REPO_ROOT / "config").glob("*.yaml"))


def parse(argv):
    return parse_args(build_parser("test"), argv)[0]


def test_default_config_is_the_embedded_tiny_model():
    cfg = parse([])
    assert cfg.model.tiny is not None and cfg.model.tiny.hidden_size <= 256
    assert cfg.method == "lora"
    assert cfg.data.train_files == ["data/train.json"]


def test_command_line_overrides_config_file(tmp_path):
    file = tmp_path / "task.yaml"
    file.write_text("method: full\ntrain:\n  max_epochs: 7\n  learning_rate: 0.5\n")
    cfg = parse(["--config", str(file), "--train.max_epochs", "2"])
    assert cfg.method == "full"
    assert cfg.train.max_epochs == 2  # flag after --config wins
    assert cfg.train.learning_rate == 0.5


@pytest.mark.parametrize(
    "argv_for",
    [
        lambda tmp: ["--train.max_epoch", "3"],
        lambda tmp: ["--config", str(_yaml(tmp, "train:\n  max_epoch: 3\n"))],
    ],
    ids=["flag", "yaml"],
)
def test_misspelled_key_exits_naming_it_and_the_nearest(tmp_path, capsys, argv_for):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv_for(tmp_path))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "max_epoch" in err
    assert "did you mean 'train.max_epochs'" in err


def test_wrong_type_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--train.max_epochs", "three"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "max_epochs" in err and err.startswith("error: ")


def test_missing_data_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="no/such/file.json"):
        check_data_files(["no/such/file.json"], "data.train_files")


def _yaml(tmp: Path, text: str) -> Path:
    path = tmp / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(config):
    cfg = parse(["--config", str(config)])
    assert isinstance(cfg, TaskConfig)
    for f in cfg.data.train_files + cfg.data.eval_files:
        assert (REPO_ROOT / f).is_file() or Path(f).is_absolute(), f"{config.name} names a missing file {f}"


def test_readme_lists_every_config_key():
    import dataclasses

    from glmtune.config import SECTIONS

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(" `"): line for line in readme.splitlines() if line.startswith("| `")}
    for name, cls in SECTIONS.items():
        assert name in rows, f"README's config table has no `{name}` row"
        missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in rows[name]]
        assert not missing, f"README's `{name}` row lacks {missing}"
