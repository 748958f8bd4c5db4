"""The pairwise reward model (`stage: reward`): the loss, and the module that trains with it.

A batch holds 2B sequences, the B prompts followed by their chosen answers and then the same prompts followed
by their rejected answers (`glmtune.data.preference.PairCollator`, as for DPO), so both are scored in one
forward. A sequence's reward is the value head (`glmtune.models.value_head`) on the backbone's last hidden
state at its last real token. The loss is the Bradley-Terry negative log-likelihood of the preference,
-log sigmoid(r_chosen - r_rejected) (InstructGPT's reward model, TRL's RewardTrainer).

The head trains with whatever the method trains (an adapter, some blocks, every weight); it is an attribute
of the module, not of the model, so the method's artifact is unchanged and the head is saved beside it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmtune.config import TrainArgs
from glmtune.models.value_head import hidden_size, last_token_rewards, new_value_head
from glmtune.training.module import CausalLMModule, build_optimizer, build_scheduler
from glmtune.training.module import _deepspeed_offloads_optimizer as deepspeed_offloads_optimizer


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected) (logsigmoid: no overflow for large margins)."""
    return -F.logsigmoid(chosen - rejected)


def freeze_unused_output_layer(model: nn.Module) -> None:
    """The language-model head plays no part in a reward: stop training it (no optimizer state for it, and
    no unused trainable weight for DDP to wait on). Not when it is the input embedding too (tied)."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if head is not None and head.weight is not getattr(embedding, "weight", None):
        head.weight.requires_grad_(False)


class RewardModule(CausalLMModule):
    """Trains `model` (with its method) and a value head on preference pairs."""

    stage = "reward"

    def __init__(
        self,
        model: nn.Module,
        train_args: TrainArgs,
        total_steps: int,
        method: str = "lora",
        value_head: nn.Linear | None = None,
    ):
        super().__init__(model, train_args, total_steps, method=method)
        self.value_head = value_head if value_head is not None else new_value_head(hidden_size(model))

    def rewards(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        return last_token_rewards(outputs.hidden_states[-1], batch["attention_mask"], self.value_head)

    def loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        rewards = self.rewards(batch, outputs)
        pairs = rewards.shape[0] // 2
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        self._log_rewards(chosen.detach(), rejected.detach())
        return pairwise_reward_loss(chosen, rejected).mean()

    def _log_rewards(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        if self._trainer is None:  # called outside a Trainer (a test of the loss)
            return
        prefix = "train" if self.training else ("test" if self.trainer.testing else "val")
        values = {
            "reward_accuracy": (chosen > rejected).float().mean(),
            "reward_margin": (chosen - rejected).mean(),
            "rewards_chosen": chosen.mean(),
            "rewards_rejected": rejected.mean(),
        }
        for name, value in values.items():
            self.log(f"{prefix}_{name}", value, sync_dist=prefix != "train", batch_size=chosen.shape[0])

    def configure_optimizers(self) -> dict[str, Any]:
        # The model's trained weights and the head (CausalLMModule's optimizer sees the model's only).
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        optimizer = build_optimizer(named, self.args, offload=deepspeed_offloads_optimizer(self._trainer))
        scheduler = build_scheduler(optimizer, self.args, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
