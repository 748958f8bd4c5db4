"""A scalar value head on a causal LM: the reward model of `stage: reward`.

The head is one `Linear(hidden_size, 1)` read at the last real (non-padding) token of each sequence, from the
backbone's last hidden state (after its final norm, what its output layer reads). It sits beside the
backbone as P-Tuning v2's prefix encoder or a PEFT adapter does: the model files are not forked, and any
backbone that returns `hidden_states` works (glmtune's ChatGLM-6B, ChatGLM2/3 and GLM-4, transformers causal
LMs, bare or PEFT-wrapped). Its weights are saved beside the method's artifact in VALUE_HEAD_FILE, in fp32.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from glmtune.config import ConfigError

VALUE_HEAD_FILE = "value_head.safetensors"


def hidden_size(model: nn.Module) -> int:
    """The width of the backbone's last hidden state (PEFT wrappers forward `.config`)."""
    size = getattr(model.config, "hidden_size", None)
    if size is None:  # configs that name it otherwise (transformers maps most of them to hidden_size)
        size = model.get_input_embeddings().embedding_dim
    return int(size)


def new_value_head(width: int) -> nn.Linear:
    """A freshly initialised head: small weights (std 1/sqrt(width), so the first rewards are O(1)), zero
    bias, fp32 whatever the backbone's dtype. Drawn from the global generator: seed first to repeat it."""
    head = nn.Linear(width, 1)
    nn.init.normal_(head.weight, std=1 / math.sqrt(width))
    nn.init.zeros_(head.bias)
    return head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b] position of each row's last real token (mask 1), whichever side the padding is on."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = torch.where(attention_mask.bool(), positions, -1).max(dim=1).values
    if bool((last < 0).any()):
        raise ValueError("a sequence without any real token (its attention_mask is all 0) has no reward")
    return last


def last_token_rewards(hidden: torch.Tensor, attention_mask: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """[b] rewards: `head` on hidden [b, s, h] at each row's last real token, computed in the head's dtype."""
    last = last_token_index(attention_mask.to(hidden.device))
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weight = next(head.parameters())
    return head(picked.to(weight.dtype)).squeeze(-1).float()


class RewardModel(nn.Module):
    """`backbone` (any causal LM returning hidden states, PEFT-wrapped or not) + a value head: forward returns
    one reward per sequence."""

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.value_head = head if head is not None else new_value_head(hidden_size(backbone))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: torch.Tensor
    ) -> torch.Tensor:
        outputs = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,  # only the hidden states are read: one position of logits is enough
            **inputs,
        )
        return last_token_rewards(outputs.hidden_states[-1], attention_mask, self.value_head)


def save_value_head(head: nn.Linear, folder: str | os.PathLike) -> Path:
    path = Path(folder) / VALUE_HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().float().cpu().contiguous() for name, t in head.state_dict().items()}
    save_file(state, str(path))
    return path


def load_value_head(folder: str | os.PathLike, width: int) -> nn.Linear:
    """The head saved in `folder`; ConfigError if it is missing or not `width` wide (another base model)."""
    path = Path(folder) / VALUE_HEAD_FILE
    if not path.is_file():
        raise ConfigError(
            f"{folder}: no {VALUE_HEAD_FILE} (a stage: reward result keeps its value head there)"
        )
    state = load_file(str(path))
    weight = state.get("weight")
    if weight is None or "bias" not in state or tuple(weight.shape) != (1, width):
        shape = None if weight is None else tuple(weight.shape)
        raise ConfigError(f"{path}: expected a weight of shape (1, {width}) and a bias, found weight {shape}")
    head = nn.Linear(width, 1)
    head.load_state_dict(state)
    return head
