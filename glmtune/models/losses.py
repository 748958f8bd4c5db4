"""Language-model loss without materialising fp32 logits over the whole vocabulary.

A 65k-vocabulary head on 8k tokens makes 2 GiB of fp32 logits, and autograd would keep them (and their
gradient) alive. Here only supervised positions are scored, a chunk of tokens at a time, and each chunk's
logits are recomputed in the backward pass instead of stored: peak extra memory is one chunk's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Mean cross entropy of `head(hidden_states[:, t])` against `labels[:, t + 1]` over labels != -100.

    hidden_states [b, s, h], labels [b, s]. Equal (up to summation order) to shifting full fp32 logits.
    `head` is called as a module, so LoRA / modules_to_save wrappers on the output layer still apply.
    """
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    supervised = targets != IGNORE_INDEX
    # Prompt and padding positions cost nothing: score only the supervised ones.
    hidden, targets = hidden[supervised], targets[supervised]
    count = targets.numel()
    if count == 0:
        return hidden_states.sum() * float("nan")  # what mean cross entropy over nothing gives, with a graph
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_size):
        piece = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            total = total + checkpoint(
                _chunk_loss_sum, head, hidden[piece], targets[piece], use_reentrant=False
            )
        else:
            total = total + _chunk_loss_sum(head, hidden[piece], targets[piece])
    return total / count
