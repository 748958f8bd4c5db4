"""bench/gpu_lora.py --tiny on the CPU: every part of the benchmark runs and its JSON holds what it measured."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHAPES = ["64x1", "32x2"]  # seq x batch, as --shapes takes them (--tiny keeps seq <= 64 and the first two)
STEPS = 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_lora")
    command = [sys.executable, "bench/gpu_lora.py", "--tiny", "--out", str(out)]
    command += ["--shapes", ",".join(SHAPES), "--steps", str(STEPS), "--warmup", "1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    files = list(out.glob("gpu_lora-*.json"))
    assert len(files) == 1, files
    assert f"wrote {files[0]} (" in done.stdout
    return json.loads(files[0].read_text()), done.stdout


def rows(report: dict, side: str) -> dict[str, dict]:
    return {r["shape"]: r for r in report["results"] if r["side"] == side}


def test_the_report_describes_the_run(run):
    report, _ = run
    assert report["card"].startswith("cpu-")  # --tiny runs on the CPU even where CUDA is visible
    assert report["matmul_flops"] > 0 and report["seconds"] > 0
    assert {r["side"] for r in report["results"]} == {"peer", "glmtune", "parity", "glmtune v1"}


@pytest.mark.parametrize("side", ["peer", "glmtune"])
def test_both_sides_time_every_shape(run, side):
    report, _ = run
    timed = rows(report, side)
    assert sorted(timed) == sorted(SHAPES)
    for shape, r in timed.items():
        seq, batch = (int(x) for x in shape.split("x"))
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["mfu"] > 0, r
        assert r["tokens_per_s"] == pytest.approx(seq * batch / r["step_s"])
        assert len(r["losses"]) == STEPS and all(math.isfinite(x) for x in r["losses"]), r
    if side == "glmtune":
        assert all(r["note"].startswith("recompute ") for r in timed.values())


def test_chatglm_v1_trains_with_bf16_int8_and_int4_weights(run):
    report, _ = run
    v1 = rows(report, "glmtune v1")
    assert sorted(v1) == ["128x1 bf16", "128x1 int4", "128x1 int8"]
    for r in v1.values():
        assert r["note"] == "", r["note"]  # an exception is reported in the note
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0, r
        assert len(r["losses"]) == STEPS and all(math.isfinite(x) for x in r["losses"]), r


def test_the_optimised_loss_curve_matches_the_unoptimised_one(run):
    report, stdout = run
    [parity] = rows(report, "parity").values()
    # note: "optimised l1 l2 ... | unoptimised l1 l2 ... | max diff D | first-step gradient rel diff G";
    # losses: the optimised curve. fp32 on the CPU: the two paths differ by rounding only.
    match = re.fullmatch(
        r"optimised ([\d. ]+) \| unoptimised ([\d. ]+) \| max diff (\S+) \| first-step gradient rel diff (\S+)",
        parity["note"],
    )
    assert match, parity["note"]
    optimised = [float(x) for x in match[1].split()]
    unoptimised = [float(x) for x in match[2].split()]
    assert optimised == pytest.approx(parity["losses"], abs=1e-4)  # the note prints 4 decimals
    assert len(unoptimised) == len(optimised) >= 2
    assert optimised[-1] != optimised[0]  # the steps moved the weights: the comparison means something
    diff = max(abs(a - b) for a, b in zip(parity["losses"], unoptimised))
    assert diff < 1e-3
    assert float(match[3]) == pytest.approx(diff, abs=1e-4)
    assert float(match[4]) < 1e-4
    assert parity["note"] in stdout
