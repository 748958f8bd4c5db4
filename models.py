"""The task's LightningModule: change the training loss here.

Training, validation and test call the model the same way in every run (all batch keys, no key/value cache:
glmtune.training.module.CausalLMModule.model_step) and then `loss(batch, outputs)` below. Everything else
(optimizer, schedule, NaN guard, checkpoints, AdaLoRA budget updates) comes from CausalLMModule.
"""

import torch

from glmtune.training.module import CausalLMModule


class ChatModel(CausalLMModule):
    # Set to True when `loss` reads outputs.logits: the model then returns full logits (more memory) instead
    # of scoring the labels chunk by chunk with outputs.logits None.
    uses_logits = False

    def loss(self, batch: dict[str, torch.Tensor], outputs) -> torch.Tensor:
        # The model's mean token cross entropy over labels != -100 (the answers). For example, with
        # uses_logits = True: F.cross_entropy(outputs.logits[:, :-1].flatten(0, 1).float(),
        #     batch["labels"][:, 1:].flatten(), ignore_index=-100, label_smoothing=0.1)
        return outputs.loss
