"""The task's LightningModule: change the loss or the batch handling here.

`model_step` is shared by training and validation; everything else (optimizer, schedule, NaN guard,
checkpoint filtering, AdaLoRA budget updates) comes from glmtune.training.module.CausalLMModule.
"""

import torch

from glmtune.training.module import CausalLMModule


class ChatModel(CausalLMModule):
    def model_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The model computes the mean token cross entropy over labels != -100 (the answers).
        return self.model(**batch).loss
