"""The LightningModule hosting a backbone with its tuning method.

The task's `models.py` subclasses it; `model_step` is the one place a researcher changes the loss or the
batch handling (train, validation and test all go through it).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from glmtune.config import TrainArgs


class NonFiniteLossError(RuntimeError):
    pass


class CausalLMModule(L.LightningModule):
    def __init__(self, model: nn.Module, train_args: TrainArgs, total_steps: int, method: str = "lora"):
        super().__init__()
        self.model = model
        self.args = train_args
        self.total_steps = total_steps
        self.method = method
        self.bad_steps_in_a_row = 0
        self.bad_steps_total = 0

    def model_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss = self.model_step(batch)
        if not torch.isfinite(loss):
            # Skip the step (no backward, no optimizer update); stop if it keeps happening.
            self.bad_steps_in_a_row += 1
            self.bad_steps_total += 1
            self.log("train/skipped_steps", float(self.bad_steps_total))
            if self.bad_steps_in_a_row >= self.args.max_bad_steps:
                raise NonFiniteLossError(
                    f"loss was {loss.item()} for {self.bad_steps_in_a_row} steps in a row (step "
                    f"{self.global_step}); lower the learning rate or use bf16 instead of fp16"
                )
            return None
        self.bad_steps_in_a_row = 0
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model_step(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # AdaLoRA reallocates its rank budget from the importance scores of the step just taken.
        if self.method == "adalora" and (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.model.base_model.update_and_allocate(self.global_step)

    def configure_optimizers(self):
        from transformers import get_scheduler

        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: check `method` and its settings")
        a = self.args
        if a.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=a.learning_rate, weight_decay=a.weight_decay)
        elif a.optimizer == "lion":
            from lion_pytorch import Lion  # extra: pip install glmtune[lion]

            optimizer = Lion(params, lr=a.learning_rate, weight_decay=a.weight_decay)
        else:
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(params, lr=a.learning_rate, weight_decay=a.weight_decay)
        name = {"cosine_restarts": "cosine_with_restarts", "constant": "constant_with_warmup"}.get(
            a.scheduler, a.scheduler
        )
        scheduler = get_scheduler(
            name, optimizer, num_warmup_steps=a.warmup_steps, num_training_steps=max(1, self.total_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # Checkpoints hold only what trains; the frozen backbone comes from the base checkpoint on resume.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["glmtune"] = {"method": self.method, "bad_steps_total": self.bad_steps_total}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        unexpected = list(result.unexpected_keys)
        if unexpected:
            raise KeyError(f"checkpoint holds tensors this model lacks: {unexpected[:3]}")
        return result


def steps_per_epoch(num_samples: int, batch_size: int, accumulate: int, world_size: int = 1) -> int:
    batches = math.ceil(num_samples / (batch_size * world_size))
    return max(1, math.ceil(batches / accumulate))
