"""Language-model loss without materialising fp32 logits over the whole vocabulary.

A 65k-vocabulary head on 8k tokens makes 2 GiB of fp32 logits, and autograd would keep them (and their
gradient) alive. Here only supervised positions are scored, a chunk of tokens at a time, so that peak extra
memory is one chunk's logits:

- a frozen plain head (LoRA and the other adapter methods, which leave the output layer as it is): each
  chunk's gradient towards the hidden states is computed in the forward, right after its loss, and kept (one
  hidden-sized tensor); the backward only scales it. The logits are computed once, not again in the backward.
- any other head (trained, adapted, sharded by ZeRO-3), or fp16 autocast: each chunk's logits are recomputed
  in the backward. Under fp16 mixed precision the loss is scaled up before the backward so that small
  gradients survive fp16; a gradient computed in the forward would be cast to fp16 before that scale.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glmtune.data.samples import IGNORE_INDEX


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of `hidden @ weight.T` (fp32 logits) against `targets`, for a frozen `weight`; the
    gradient towards `hidden` is computed chunk by chunk in the forward, with the ops autograd would run for
    it (`exp(log_softmax) * scale`, minus `scale` at the target, cast to the logits' dtype, times `weight`)."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int
    ) -> torch.Tensor:
        count = targets.numel()
        scale = 1.0 / count  # d mean / d each token's loss
        grad_hidden = torch.empty_like(hidden)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, count, chunk_size):
            piece = slice(start, start + chunk_size)
            logits = F.linear(hidden[piece], weight)  # half precision under autocast
            logits_dtype = logits.dtype
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            del logits
            rows = torch.arange(log_probs.shape[0], device=log_probs.device)
            picked = log_probs[rows, targets[piece]]
            total = total - picked.sum()
            grad_logits = log_probs.exp_().mul_(scale)
            grad_logits[rows, targets[piece]] -= scale
            grad_hidden[piece] = grad_logits.to(logits_dtype) @ weight
            del log_probs
        ctx.save_for_backward(grad_hidden)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        # 1.0 for loss.backward(); under gradient accumulation Lightning scales the loss first.
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None


def frozen_plain_head(head: nn.Module) -> bool:
    """Whether `head` is a bias-free nn.Linear whose weight is frozen and held whole on this device (not a
    ZeRO-3 shard, whose gathering only happens when the module itself is called)."""
    return (
        type(head) is nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and head.weight.numel() > 0
        and not hasattr(head.weight, "ds_id")
    )


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
    device = hidden.device.type
    fp16_autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    if frozen_plain_head(head) and torch.is_grad_enabled() and hidden.requires_grad and not fp16_autocast:
        return _FrozenHeadCrossEntropy.apply(hidden, head.weight, targets, chunk_size)
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
