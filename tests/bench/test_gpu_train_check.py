"""bench/gpu_train_check.py --tiny on the CPU: a case trains and reloads; a GPU-only case fails with a clear
error row, not a traceback."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("gpu_train_check", REPO / "bench" / "gpu_train_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(tmp_path: Path, *cases: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run the script on `cases`; its work folder goes under tmp_path (it makes it with tempfile.mkdtemp)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    command = [sys.executable, "bench/gpu_train_check.py", "--tiny", "--cases", *cases]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == list(cases), done.stdout + done.stderr[-4000:]
    return done, rows


def work_folder(stdout: str, tmp_path: Path) -> Path:
    [match] = re.findall(r"^total \d+ s; logs of failed cases in (.+)$", stdout, flags=re.M)
    work = Path(match)
    assert work.parent == tmp_path and work.name.startswith("gpu_train_check-")
    return work


def table_row(stdout: str, case: str) -> list[str]:
    [line] = [line for line in stdout.splitlines() if line.startswith(f"| {case} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_bf16_lora_trains_and_its_adapter_reloads(script, tmp_path):
    done, [row] = check(tmp_path, "bf16_lora")
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "error" not in row, row
    assert row["steps"] == script.STEPS
    assert row["last_loss"] < row["first_loss"]
    assert row["peak_gib"] > 0 and row["seconds"] > 0
    reload = re.fullmatch(r"ok \(([\d,]+) LoRA weights\)", row["reload"])
    assert reload and int(reload[1].replace(",", "")) > 0, row["reload"]
    cells = table_row(done.stdout, "bf16_lora")
    assert int(cells[1]) == script.STEPS and cells[-1] == row["reload"]
    assert (work_folder(done.stdout, tmp_path) / "bf16_lora").is_dir()  # the case's training output


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error shows only where no CUDA GPU is visible")
def test_a_gpu_only_case_fails_with_a_clear_error_row(tmp_path):
    done, [row] = check(tmp_path, "qlora_nf4")
    assert done.returncode == 1
    assert "Traceback" not in done.stdout
    assert "model.quantization=nf4 needs a CUDA GPU" in row["error"], row
    assert table_row(done.stdout, "qlora_nf4")[-1] == f"error: {row['error']}"
    log = (
        work_folder(done.stdout, tmp_path) / "qlora_nf4.stderr.log"
    ).read_text()  # the full traceback is kept for whoever debugs it
    assert row["error"] in log
