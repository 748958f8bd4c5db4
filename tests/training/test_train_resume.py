"""`train.resume` continues exactly: stop after K optimizer steps, resume to 2K, compare with a 2K run."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glmtune.training.trainer import train
from tests.conftest import REPO_ROOT
from tests.training.conftest import make_cfg
from tests.training.training_helpers import LossProbe, train_script, write_config


class WeightsAtEnd(LossProbe):
    def on_train_end(self, trainer, module) -> None:
        super().on_train_end(trainer, module)
        self.weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]


def run(cfg, **overrides) -> tuple[WeightsAtEnd, object]:
    probe = WeightsAtEnd()
    result = train(cfg, callbacks=[probe], enable_progress_bar=False, **overrides)
    return probe, result


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "ptv2", "adalora"])
def test_resume_mid_epoch_matches_uninterrupted_run(method, tiny_chatglm2, tiny_data, tmp_path):
    # The tiny data gives 9 micro-batches of 4 per epoch, 2 per step: step 4 stops inside epoch 0, the resumed
    # run finishes epoch 0 (a short accumulation at its end) and goes on into epoch 1.
    # Dropout is on, so the resumed run must also draw the same random masks.
    settings = dict(
        max_steps=8, accumulate_grad_batches=2, scheduler="cosine", warmup_steps=2, learning_rate=5e-3
    )
    full_cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "full", method, **settings)
    full_cfg.lora.dropout = 0.1
    full, full_result = run(full_cfg)

    # The interrupted run plans the same 8 steps (schedule, AdaLoRA budget) but Lightning stops it after 4,
    # as a time limit or a preemption would.
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "parts", method, **settings)
    cfg.lora.dropout = 0.1
    first, first_result = run(cfg, max_steps=4)
    assert first_result.global_step == 4
    cfg.train.resume = "last"
    second, second_result = run(cfg)
    assert second_result.global_step == full_result.global_step == 8

    # Every micro-batch the two halves ran is one the uninterrupted run ran, with the same loss.
    assert set(first.step_losses) | set(second.step_losses) == set(full.step_losses)
    assert not set(first.step_losses) & set(second.step_losses)
    for key, loss in {**first.step_losses, **second.step_losses}.items():
        assert loss == pytest.approx(full.step_losses[key], abs=1e-6), key
    assert second.lr == pytest.approx(full.lr, abs=1e-12)
    for name, value in full.weights.items():
        torch.testing.assert_close(second.weights[name], value, atol=1e-6, rtol=0)


def test_resume_without_a_checkpoint_is_an_error_line(tiny_chatglm2, tiny_data, tmp_path, capsys):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", "lora")
    config = write_config(cfg, tmp_path / "task.yaml")
    for resume, named in (("last", tmp_path / "run" / "checkpoints"), ("gone.ckpt", "gone.ckpt")):
        assert train_script().main(["--config", str(config), "--train.resume", resume]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: train.resume") and str(named) in err[-1], err
        assert "Traceback" not in "\n".join(err)


def _train_until(config: Path, *flags: str, kill_after: Path | None = None) -> str:
    """`python train.py --config config FLAGS`; killed with SIGKILL as soon as `kill_after` exists. Returns
    the run's output."""
    command = [sys.executable, "train.py", "--config", str(config), *flags]
    with subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        if kill_after is not None:
            while not kill_after.exists() and process.poll() is None:
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
        output, _ = process.communicate(timeout=300)
    if kill_after is not None:
        assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{output}"
    else:
        assert process.returncode == 0, output
    return output


def _first_logged_step(out: Path, version: int) -> int:
    """How many optimizer steps were done when the `version`-th start of a run logged its first loss."""
    rows = csv.DictReader((out / "logs" / f"version_{version}" / "metrics.csv").open())
    return min(int(r["step"]) for r in rows if r.get("train_loss"))


@pytest.mark.slow
def test_kill_9_then_resume_last_ends_as_the_uninterrupted_run(tiny_chatglm2, tiny_data, tmp_path):
    # 17 micro-batches of 2 per epoch, a checkpoint every 4 steps and last.ckpt also after each evaluation
    # (every 5 steps): killed in epoch 0 (no epoch end yet), then in epoch 1 between epoch ends; each resume
    # continues from the newest checkpoint. Dropout is on.
    settings = dict(
        max_epochs=3,
        batch_size=2,
        save_every_n_steps=4,
        eval_every_n_steps=5,
        scheduler="cosine",
        warmup_steps=2,
    )
    full_cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "full", "lora", **settings)
    full_cfg.lora.dropout = 0.1
    _train_until(write_config(full_cfg, tmp_path / "full.yaml"))

    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "parts", "lora", **settings)
    cfg.lora.dropout = 0.1
    config = write_config(cfg, tmp_path / "parts.yaml")
    checkpoints = tmp_path / "parts" / "checkpoints"
    _train_until(config, kill_after=checkpoints / "step-8.ckpt")
    output = _train_until(config, "--train.resume", "last", kill_after=checkpoints / "step-28.ckpt")
    assert f"Restored all states from the checkpoint at {checkpoints}" in output, output
    assert _first_logged_step(tmp_path / "parts", version=1) >= 8
    output = _train_until(config, "--train.resume", "last")
    assert f"Restored all states from the checkpoint at {checkpoints}" in output, output
    assert _first_logged_step(tmp_path / "parts", version=2) >= 28  # not from an epoch end: no step redone

    full = load_file(tmp_path / "full" / "final" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "parts" / "final" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and full
    for name, value in full.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=0)
