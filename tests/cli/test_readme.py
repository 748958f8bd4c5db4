"""README.md's shell blocks, run in order on a copy of the checkout, the way a newcomer types them.

What the test changes, and why (everything else runs as written):
- `make demo` / `make test` are not run: they install into .venv and run this suite. The demo's own commands
  (the Makefile's `demo` recipe) run in their place.
- `pip install ...` is not run: .venv has the extras already (`make test` installs them), and an editable
  install from the copy would repoint .venv's glmtune at it.
- `train.py` gets `--train.max_steps 4` (the README's configs train for minutes): each line still runs its
  whole path, only shorter; the answers are then not the demo's memorised ones, which this test does not read.
- `infer_api.py` runs on a free port: it is started, /health is polled until it answers, then it is stopped.
- `curl` lines need that server between commands, and the multi-machine example (config/multinode_3x4.yaml)
  needs ChatGLM2-6B and three GPU machines: skipped.
Every command must exit 0 with no traceback and print none of the warnings glmtune's own calls used to cause.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SHORT_TRAINING = "--train.max_steps 4"
# Warnings our code caused once (deprecated transformers names, a default logging interval longer than an
# epoch, Lightning's notes on a reused checkpoint folder and its logger version), and float noise in scores.
OUR_WARNINGS = re.compile(
    r"is_gradient_checkpointing|gradient_checkpointing_enable|log_every_n_steps|Checkpoint directory"
    r"|v_num|\d\.\d{9,}|glmtune/\S+\.py:\d+: \w*Warning"
)


def readme_commands(name: str = "README.md") -> list[str]:
    """The command lines of a README's ```bash blocks, in order (continuation lines joined)."""
    text = (REPO_ROOT / name).read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def demo_commands() -> list[str]:
    """The Makefile's `demo` recipe, with `python` for $(PY)."""
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    return [line.strip().replace("$(PY)", "python") for line in recipe.splitlines()]


def copy_checkout(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in files:
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to(VENV)


# The environment running these tests (the checkout's .venv under `make test`), which the README activates.
VENV = Path(sys.prefix)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def without_comment(command: str) -> str:
    return command.split(" #")[0].rstrip()


def serve_until_healthy(command: str, cwd: Path, env: dict) -> str:
    port = free_port()
    command = re.sub(r"--port \d+", f"--port {port}", without_comment(command))
    if "--port" not in command:
        command += f" --port {port}"
    server = subprocess.Popen(
        ["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert server.poll() is None, f"{command} exited:\n{server.stdout.read()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"{command}: no answer on /health in 300 s")
    finally:
        server.terminate()
        output = server.communicate(timeout=60)[0]
    return output


def run(command: str, cwd: Path, env: dict) -> str:
    if re.search(r"\btrain\.py\b", command):
        command = f"{without_comment(command)} {SHORT_TRAINING}"
    result = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, f"{command}:\n{output[-4000:]}"
    return output


@pytest.mark.slow
def test_the_readme_runs_as_written(tmp_path: Path) -> None:
    copy_checkout(tmp_path)
    env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    ran = []
    for command in [*demo_commands(), *readme_commands()]:
        if command.startswith(("make ", "pip ", "curl ")) or "multinode_3x4" in command:
            continue
        if command.startswith("python infer_api.py"):
            output = serve_until_healthy(command, tmp_path, env)
        else:
            output = run(command, tmp_path, env)
        noise = [line for line in output.splitlines() if OUR_WARNINGS.search(line)]
        assert not noise, f"{command} printed:\n" + "\n".join(noise[:10])
        ran.append(command)
    assert any("train.py" in c for c in ran) and any("infer_api.py" in c for c in ran), ran
