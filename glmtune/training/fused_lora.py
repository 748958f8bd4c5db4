"""LoRA on nn.Linear whose update is added by the GEMM that computes it.

PEFT's dense LoRA computes `result + lora_B(lora_A(x)) * scaling`: the low-rank product is written out,
scaled into a second tensor and added into a third (in fp32 when the adapter is fp32 and the base bf16). On a
ChatGLM MLP that is several passes over a 27k-wide activation per block. Here the update is one
`addmm(result, x A^T, B^T, alpha=scaling)`: the low-rank product is accumulated straight into the base output.
The adapter's parameters, names, saving, loading and merging are PEFT's own; only `forward` changes, and it
falls back to PEFT's for anything but one plain active adapter (DoRA and other variants, mixed batches,
merged or disabled adapters, a LoRA bias).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn


@functools.cache
def fused_lora_linear_class() -> type[nn.Module]:
    from peft.tuners.lora.layer import Linear as LoraLinear

    class FusedLoraLinear(LoraLinear):
        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            active = self.active_adapters
            name = active[0] if len(active) == 1 else None
            if (
                name is None
                or self.disable_adapters
                or self.merged
                or kwargs.get("adapter_names") is not None
                or name not in self.lora_A
                or name in self.lora_variant
                or self.lora_B[name].bias is not None
            ):
                return super().forward(x, *args, **kwargs)
            self._check_forward_args(x, *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            lora_a = self.lora_A[name]
            low_rank = lora_a(
                self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype))
            )  # [..., r]
            fused = torch.addmm(
                result.reshape(-1, result.shape[-1]),
                low_rank.reshape(-1, low_rank.shape[-1]).to(result.dtype),
                self.lora_B[name].weight.t().to(result.dtype),
                alpha=self.scaling[name],
            )
            return fused.view(result.shape)

        def __repr__(self) -> str:
            return "lora.Fused" + nn.Module.__repr__(self)

    return FusedLoraLinear


def register_fused_lora(config: Any) -> Any:
    """Make a peft.LoraConfig wrap nn.Linear targets with FusedLoraLinear; returns the config."""
    config._register_custom_module({nn.Linear: fused_lora_linear_class()})
    return config
