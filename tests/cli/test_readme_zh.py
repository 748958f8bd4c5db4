"""README.zh-CN.md says what README.md says: the same commands in the same order, every config key."""

import re

from tests.cli.test_readme import readme_commands, without_comment
from tests.conftest import REPO_ROOT


def test_the_chinese_readme_runs_the_same_commands_in_the_same_order() -> None:
    english = [without_comment(c) for c in readme_commands("README.md")]
    chinese = [without_comment(c) for c in readme_commands("README.zh-CN.md")]
    assert chinese == english


def test_the_chinese_readme_lists_every_config_key_of_the_english_table() -> None:
    english = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    chinese = (REPO_ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
    table = english.split("## Config keys", 1)[1].split("\n## ", 1)[0]
    keys = {
        key
        for row in table.splitlines()
        if row.startswith("| `")
        for key in re.findall(r"`([\w.]+)`", row.split("|")[2] + row.split("|")[1])
    }
    assert len(keys) > 80  # the table's sections and keys
    missing = sorted(key for key in keys if f"`{key}`" not in chinese)
    assert not missing, f"README.zh-CN.md lacks {missing}"


def test_the_english_readme_links_the_chinese_one_at_its_top() -> None:
    head = (REPO_ROOT / "README.md").read_text(encoding="utf-8").split("\n## ", 1)[0]
    assert "(README.zh-CN.md)" in head
