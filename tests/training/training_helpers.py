"""Shared test utilities: a loss probe callback and the evaluation loss of a reloaded artifact."""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import Dataset


def dataset_loss(model: nn.Module, dataset: Dataset, collate, batch_size: int) -> float:
    """Mean of per-batch losses weighted by batch size: what Lightning logs as val_loss."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate(items).items()}
            labels = batch.pop("labels")
            # The loss from the logits: PEFT's AdaLoRA adds its regulariser to (or, loaded for inference,
            # fails on) a loss computed inside the model.
            logits = model(**batch).logits[:, :-1].float()
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            total += float(loss) * len(items)
            count += len(items)
    return total / count


class LossProbe(L.Callback):
    """The loss on the first training samples, before the first step and after the last one (eval mode)."""

    def __init__(self, samples: int = 8) -> None:
        self.samples = samples
        self.before: float | None = None
        self.after: float | None = None
        self.step_losses: dict[int, float] = {}

    def _loss(self, trainer: L.Trainer, module: L.LightningModule) -> float:
        loader = trainer.train_dataloader
        batch = loader.collate_fn([loader.dataset[i] for i in range(self.samples)])
        batch = {k: v.to(module.device) for k, v in batch.items()}
        was_training = module.training
        module.eval()
        with torch.no_grad():
            loss = float(module.model_step(batch))
        module.train(was_training)
        return loss

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.before = self._loss(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.step_losses[(trainer.current_epoch, batch_idx)] = float(loss)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.after = self._loss(trainer, module)


def write_config(cfg, path: Path) -> Path:
    """`cfg` as a task YAML, for running the scripts (`--config path`) with it."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def train_script():
    """train.py as a module: main(argv) runs what `python train.py ARGV` runs, in this process."""
    return importlib.import_module("train")
