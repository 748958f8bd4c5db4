"""The task's LightningModule: change the training loss here.

Every run calls the model the same way (every batch key but the labels, no key/value cache:
CausalLMModule.model_step) and then `loss(batch, outputs)` below, in training, validation and test. The model
returns its hidden states (`outputs.hidden_states[-1]` is the last, normed one) and, with `uses_logits = True`,
the logits of every position. Label smoothing, for example: set `uses_logits = True` and return
F.cross_entropy(outputs.logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
ignore_index=-100, label_smoothing=0.1). Optimizer, schedule, NaN guard, checkpoints and AdaLoRA's regulariser
and budget come from glmtune.training.module.CausalLMModule.
"""

import torch

from glmtune.models.losses import chunked_causal_lm_loss
from glmtune.training.module import LOSS_CHUNK_TOKENS, CausalLMModule


class ChatModel(CausalLMModule):
    # True when `loss` reads outputs.logits: the model then returns the logits of every position (more memory);
    # False, it computes them for the last position only.
    uses_logits = False

    def loss(self, batch: dict[str, torch.Tensor], outputs) -> torch.Tensor:
        # The mean next-token cross entropy over the labels that are not -100 (the answers): the last hidden
        # state through the output layer, a chunk of tokens at a time, so that the fp32 logits over the whole
        # vocabulary never exist at once.
        head = self.model.get_output_embeddings()
        return chunked_causal_lm_loss(outputs.hidden_states[-1], head, batch["labels"], LOSS_CHUNK_TOKENS)
