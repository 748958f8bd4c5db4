"""glmtune installed from its wheel (not the checkout) runs from an empty folder: the README's Python API example
and the `glmtune` command.

The fresh virtual environment sees .venv's packages (torch and the rest) through a .pth line instead of
installing them again, and not .venv's editable glmtune (a path in a .pth file is added as it is, the
editable install's own .pth inside it is not run). What the test changes: the example's `.tune()` trains
2 steps (`tune(max_steps=2)`) and `glmtune train` too, to keep the test short.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def readme_python_example() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    example = re.search(r"```python\n(import glmtune\n.*?)```", text, re.S).group(1)
    assert ".tune()" in example
    return example.replace(".tune()", ".tune(max_steps=2)")


def build_wheel(dest: Path) -> Path:
    """The wheel of the checkout's tracked files (built from a copy: no build/ or egg-info in the checkout)."""
    source = dest / "source"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in files:
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
         "-w", str(dest / "wheel")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return next((dest / "wheel").glob("glmtune-*.whl"))


def fresh_venv(dest: Path, wheel: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True, timeout=120)
    python = dest / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "checkout-venv-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return dest / "bin"


def run(args: list, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the environment installed
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, f"{args}:\n{output[-4000:]}"
    return result.stdout


@pytest.mark.slow
def test_the_installed_package_runs_from_an_empty_folder(tmp_path: Path) -> None:
    bin_dir = fresh_venv(tmp_path / "env", build_wheel(tmp_path / "build"))
    empty = tmp_path / "empty"
    empty.mkdir()
    where = run([bin_dir / "python", "-c", "import glmtune; print(glmtune.__file__)"], empty)
    assert where.strip().startswith(str(tmp_path / "env")), where  # the wheel's copy, not the checkout's

    run([bin_dir / "python", "-c", readme_python_example()], empty)
    assert (empty / "output" / "api" / "final").is_dir() and (empty / "output" / "api-merged").is_dir()

    assert "records:" in run([bin_dir / "glmtune", "data"], empty)
    assert "saved lora result to output/run/final" in run(
        [bin_dir / "glmtune", "train", "--train.max_steps", "2"], empty
    )
    assert "exact match: " in run([bin_dir / "glmtune", "predict", "data/dev.json", "--limit", "2"], empty)
    assert sorted(p.name for p in empty.iterdir()) == ["output"]  # nothing but its outputs in the folder
