"""data.packing as a user reaches it: a packed run learns what an unpacked run on the same data learns, and
train.py with --data.packing true trains ChatGLM-6B and ChatGLM2 end to end."""

from __future__ import annotations

import copy
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glmtune.data.dataset import RecordDataset
from glmtune.training.trainer import train
from tests.conftest import REFERENCE, REPO_ROOT
from tests.training.conftest import make_cfg
from tests.training.test_train_methods import eval_loss_of, reload_artifact
from tests.training.training_helpers import LossProbe


def reference_copy(name: str, folder: Path) -> Path:
    """A reference checkpoint copied so runs can write beside it; missing references fail, not skip."""
    assert REFERENCE.is_dir(), f"reference checkpoints not found at {REFERENCE}"
    shutil.copytree(REFERENCE / name, folder, ignore=shutil.ignore_patterns("golden.pt"))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    # packed batch sizes chosen so that a step sees about as many samples as an unpacked batch of 4
    ("family", "packed_batch_size", "epochs"),
    [("chatglm2", 2, 4), ("chatglm", 1, 3)],
)
def test_packed_and_unpacked_runs_reach_the_same_eval_loss(
    family: str, packed_batch_size: int, epochs: int, tiny_chatglm2: Path, tiny_data, tmp_path: Path
):
    model_dir = (
        tiny_chatglm2 if family == "chatglm2" else reference_copy("chatglm-6b-tiny", tmp_path / "glm6b")
    )
    runs = {}
    for packing, batch_size in ((False, 4), (True, packed_batch_size)):
        cfg = make_cfg(
            model_dir, tiny_data, tmp_path / f"run-{packing}", batch_size=batch_size, max_epochs=epochs
        )
        cfg.data.max_seq_length = 128
        cfg.data.packing = packing
        cfg.data.output_dir = str(tmp_path / f"records-{packing}")
        probe = LossProbe()
        result = train(cfg, callbacks=[probe], enable_progress_bar=False)
        runs[packing] = (cfg, probe, result)

    plain_cfg, plain_probe, _ = runs[False]
    packed_cfg, _, packed_result = runs[True]
    packed_records = RecordDataset(Path(packed_cfg.data.output_dir) / "train")
    assert packed_records.packed and len(packed_records) * 1.8 < len(
        RecordDataset(Path(plain_cfg.data.output_dir))
    )
    assert math.isfinite(packed_result.metrics["val_loss"])  # validated on packed records

    # Both artifacts scored on the same, unpacked evaluation records.
    losses = {}
    for packing, (cfg, _, result) in runs.items():
        scored = copy.deepcopy(cfg)
        scored.data.output_dir = plain_cfg.data.output_dir
        losses[packing] = eval_loss_of(reload_artifact(cfg, result.artifact_dir), scored)
    learned = plain_probe.before - losses[False]
    assert learned > 0.3, (plain_probe.before, losses)
    assert abs(losses[True] - losses[False]) < 0.1 * learned, losses


@pytest.mark.slow
@pytest.mark.parametrize("name", ["chatglm-6b-tiny", "chatglm2-6b-tiny"])
def test_train_script_with_packing(name: str, tmp_path: Path):
    model_dir = reference_copy(name, tmp_path / "model")
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--model.path", str(model_dir),
            "--model.dtype", "float32",
            "--data.packing", "true",
            "--data.max_seq_length", "128",
            "--data.output_dir", str(tmp_path / "records"),
            "--train.output_dir", str(tmp_path / "run"),
            "--train.max_epochs", "1",
            "--train.accelerator", "cpu",
            "--train.precision", "32",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "packed" in result.stdout + result.stderr
    assert RecordDataset(tmp_path / "records" / "train").packed
    assert (tmp_path / "run" / "final").is_dir()
