"""Each training key has its effect: tested through `train(cfg)` on the tiny ChatGLM2, as train.py runs it."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from glmtune.config import ConfigError
from glmtune.training.trainer import train
from tests.training.conftest import make_cfg


class Batches(L.Callback):
    """The input_ids of every training micro-batch, in the order the run took them."""

    def __init__(self) -> None:
        self.input_ids: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.loader = trainer.train_dataloader
        self.input_ids.append(batch["input_ids"].clone())


class TrainedWeights(L.Callback):
    def on_train_end(self, trainer, module) -> None:
        self.weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def validated_steps(out: Path) -> list[int]:
    rows = csv.DictReader(next((out / "logs").rglob("metrics.csv")).open())
    return [int(r["step"]) for r in rows if r.get("val_loss")]


# ---------------------------------------------------------------------------------------------- data


class Validations(L.Callback):
    """val_loss after each validation, by the optimizer step it followed."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_validation_end(self, trainer, module) -> None:
        self.losses[trainer.global_step] = float(trainer.callback_metrics["val_loss"])


@pytest.mark.slow
def test_eval_ratio_validates_and_keeps_the_best(tiny_chatglm2, tiny_data, tmp_path):
    # A learning rate high enough that the eval loss turns up again: the best is not the last.
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", max_epochs=2, eval_every_n_steps=2)
    cfg.train.learning_rate = 0.2
    cfg.data.eval_files, cfg.data.eval_ratio = [], 0.25
    validations = Validations()
    result = train(cfg, callbacks=[validations], enable_progress_bar=False)

    losses = validations.losses
    best_step = min(losses, key=losses.get)
    assert len(losses) >= 3 and best_step != max(losses), losses
    best = torch.load(result.checkpoint_dir / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["global_step"] == best_step
    assert result.best_artifact_dir is not None
    saved = json.loads((result.best_artifact_dir / "metrics.json").read_text())
    assert saved["val_loss"] == pytest.approx(losses[best_step], abs=1e-5)


def test_eval_generate_needs_eval_files(tiny_chatglm2, tiny_data, tmp_path):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", eval_generate=2)
    cfg.data.eval_files, cfg.data.eval_ratio = [], 0.25
    with pytest.raises(ConfigError, match="train.eval_generate.*data.eval_files"):
        train(cfg, enable_progress_bar=False)


@pytest.mark.parametrize("shuffle", [False, True])
def test_shuffle_false_keeps_record_order(shuffle, tiny_chatglm2, tiny_data, tmp_path):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", max_steps=5)
    cfg.data.eval_files = []
    cfg.data.shuffle = shuffle
    batches = Batches()
    train(cfg, callbacks=[batches], enable_progress_bar=False)

    loader = batches.loader
    in_record_order = [
        loader.collate_fn([loader.dataset[i] for i in range(start, start + 4)])["input_ids"]
        for start in range(0, 20, 4)
    ]
    assert len(batches.input_ids) == 5
    same = all(torch.equal(a, b) for a, b in zip(batches.input_ids, in_record_order))
    assert same is not shuffle


# ---------------------------------------------------------------------------------------------- train


def test_progress_bar_counts_micro_batches_under_max_steps(tiny_chatglm2, tiny_data, tmp_path, capsys):
    # 9 micro-batches per epoch, 2 per step (5 steps, the last one short): 7 steps are epoch 0 and 4
    # micro-batches of epoch 1.
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", max_steps=7, accumulate_grad_batches=2)
    cfg.data.eval_files = []
    train(cfg)
    shown = capsys.readouterr().out.replace("\r", "\n")
    bars = re.findall(r"^Epoch (\S+): .*?\| *(\d+)/(\S+) ", shown, flags=re.MULTILINE)
    totals = {(epoch, total) for epoch, _, total in bars}
    assert totals == {("0", "9"), ("1", "4")}, sorted(set(bars))
    assert {("0", "9", "9"), ("1", "4", "4")} <= set(bars)  # each epoch's bar reaches its end
