"""The embedded default ships inside the package; the checkout's config/ and data/ hold copies of it."""

from pathlib import Path

import pytest

from glmtune import config
from glmtune.config import DEFAULT_CONFIG, DEMO_DIR, resolve_path
from tests.conftest import REPO_ROOT

COPIES = {
    "config/default.yaml": DEFAULT_CONFIG,
    "data/train.json": DEMO_DIR / "data" / "train.json",
    "data/dev.json": DEMO_DIR / "data" / "dev.json",
}


@pytest.mark.parametrize("copy", sorted(COPIES))
def test_the_checkouts_copy_equals_the_packaged_file(copy: str) -> None:
    packaged = COPIES[copy]
    assert (REPO_ROOT / copy).read_bytes() == packaged.read_bytes(), (
        f"{copy} and {packaged.relative_to(REPO_ROOT)} differ: edit both (the package's is what runs by default)"
    )


def test_a_demo_file_missing_here_is_the_packaged_copy_said_once(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    config._say_the_demo_copy_is_used.cache_clear()
    assert resolve_path("data/train.json") == DEMO_DIR / "data" / "train.json"
    assert resolve_path("data/train.json") == DEMO_DIR / "data" / "train.json"
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == [
        f"note: no data/train.json in {tmp_path}: using glmtune's demo copy ({DEMO_DIR}/data/train.json)"
    ]


def test_a_file_of_the_same_name_here_wins_without_a_note(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    config._say_the_demo_copy_is_used.cache_clear()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    assert resolve_path("data/train.json") == Path("data/train.json")
    assert resolve_path("data/nothing.json") == Path("data/nothing.json")  # neither here nor in the demo
    assert capsys.readouterr().err == ""
