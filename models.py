"""The task's LightningModule: change the training loss here.

Every run calls the model the same way (all batch keys, no key/value cache: CausalLMModule.model_step) and
then `loss(batch, outputs)` below, in training, validation and test. Label smoothing, for example: set
`uses_logits = True` and return F.cross_entropy(outputs.logits[:, :-1].flatten(0, 1).float(),
batch["labels"][:, 1:].flatten(), ignore_index=-100, label_smoothing=0.1). Optimizer, schedule, NaN guard,
checkpoints and AdaLoRA's budget come from glmtune.training.module.CausalLMModule.
"""

import torch

from glmtune.training.module import CausalLMModule


class ChatModel(CausalLMModule):
    # True when `loss` reads outputs.logits: the model then returns the full logits (more memory) instead of
    # scoring the labels chunk by chunk (outputs.logits is None).
    uses_logits = False

    def loss(self, batch: dict[str, torch.Tensor], outputs) -> torch.Tensor:
        # The model's mean token cross entropy over the labels that are not -100 (the answers).
        return outputs.loss
