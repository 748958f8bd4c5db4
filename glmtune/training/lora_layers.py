"""glmtune's LoRA layers for PEFT, and their registration on a LoraConfig (PEFT's custom-module API).

- `FusedLoraLinear`, on nn.Linear: the update is added by the GEMM that computes it (below).
- `QuantizedLoraLinear`, on glmtune's int8/int4 `QuantizedLinear`: plain LoRA beside integer base weights.

PEFT's default dispatch wraps only torch.nn.Linear (and a few known quantized types); a layer of its own is
registered on the one config that creates the adapter, never process-wide. The registration is not written to
adapter_config.json, so a saved adapter is loaded with `load_lora_adapter`, which registers again.

Fused LoRA: PEFT's dense LoRA computes `result + lora_B(lora_A(x)) * scaling`: the low-rank product is written out,
scaled into a second tensor and added into a third (in fp32 when the adapter is fp32 and the base bf16). On a
ChatGLM MLP that is several passes over a 27k-wide activation per block. Here the update is one
`addmm(result, x A^T, B^T, alpha=scaling)`: the low-rank product is accumulated straight into the base output.
The adapter's parameters, names, saving, loading and merging are PEFT's own; only `forward` changes, and it
falls back to PEFT's for anything but one plain active adapter (DoRA and other variants, mixed batches,
merged or disabled adapters, a LoRA bias).

Memory: with a half-precision base and fp32 adapters (PEFT's default), PEFT casts the input to fp32 before
`lora_A`, and autograd keeps that fp32 copy for A's gradient: twice the bytes of the input, for every adapted
linear (on ChatGLM2 the 13,696-wide MLP activation among them; a fifth of a block's saved activations). Without
LoRA dropout, `lora_A` here keeps the input as it came and casts it again in the backward: the same values,
half the memory.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmtune.models.quantization import QuantizedLinear


class _CastLinear(torch.autograd.Function):
    """`F.linear(x.to(weight.dtype), weight)` that saves `x` in its own dtype, not the cast copy (see the module
    docstring); the gradients are those autograd computes for the cast and the linear."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight).to(x.dtype)
        if ctx.needs_input_grad[1]:
            flat_grad = grad.reshape(-1, grad.shape[-1])
            grad_weight = flat_grad.t().mm(x.reshape(-1, x.shape[-1]).to(weight.dtype))
        return grad_x, grad_weight


def keeps_input_dtype(lora_a: nn.Linear, dropout: nn.Module, x: torch.Tensor) -> bool:
    """Whether `lora_A` can run through `_CastLinear`: a real cast (half input, fp32 adapter), no dropout (it
    would run on the cast copy), no bias, no autocast (which casts, and saves, on its own)."""
    return (
        isinstance(dropout, nn.Identity)
        and lora_a.bias is None
        and x.dtype != lora_a.weight.dtype
        and not torch.is_autocast_enabled(x.device.type)
    )


def hidden_from_recomputation(base_layer: nn.Module) -> contextlib.AbstractContextManager:
    """Keep what the frozen base GEMM and the LoRA update save out of sight of activation checkpointing, so
    that recomputing a block stops before its last GEMM.

    Non-reentrant checkpointing (`torch.utils.checkpoint`, early stop on) reruns a block's forward in the
    backward only until every tensor the first forward saved has been produced again. What the last adapted
    linear of a block (ChatGLM's `dense_4h_to_h`) saves is its input (for lora_A) and, for the frozen GEMM and
    the update, only the weights and the rank-r product. Saved inside these hooks, those are kept as they are
    (parameters, and 2r bytes a token), the recomputation stops right after lora_A, and the base GEMM, a
    quarter of a ChatGLM2 block's forward, is not run again for nothing. Only for a plain nn.Linear base: a
    quantized one may save a dequantized weight, which must be dropped and recomputed as before. Not under
    torch.compile, whose partitioner decides what a compiled block recomputes
    (`glmtune.training.compile.recompute_block`)."""
    if type(base_layer) is not nn.Linear or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


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
            lora_a, dropout = self.lora_A[name], self.lora_dropout[name]
            # lora_A first: it saves the input, the last activation a block's backward needs (see
            # `hidden_from_recomputation`).
            if getattr(self, "cast_input_dtype_enabled", True) and keeps_input_dtype(lora_a, dropout, x):
                low_rank = _CastLinear.apply(x, lora_a.weight)  # [..., r]
            else:
                low_rank = lora_a(dropout(self._cast_input_dtype(x, lora_a.weight.dtype)))
            with hidden_from_recomputation(self.base_layer):
                result = self.base_layer(x, *args, **kwargs)
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


@functools.cache
def quantized_lora_linear_class() -> type[nn.Module]:
    """The PEFT LoRA layer that wraps a QuantizedLinear. PEFT's dense `lora.Linear` already does the right
    thing in forward (base output + B(A(dropout(x))) * scaling); only what depends on the base weight being
    float changes."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class QuantizedLoraLinear(LoraLinear):
        """LoRA adapter around a frozen QuantizedLinear; adapters stay in float, base weights untouched."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        @property
        def lora_variants(self) -> dict[tuple[str, ...], Any]:
            # DoRA & co. read or rewrite the base weight; only plain LoRA is supported on int weights.
            return {(): None}

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            raise NotImplementedError(
                "cannot merge a LoRA adapter into int8/int4 weights; load the float model to merge"
            )

        def __repr__(self) -> str:
            return "lora.Quantized" + nn.Module.__repr__(self)

    return QuantizedLoraLinear


def register_lora_layers(config: Any, *, fused: bool = False) -> Any:
    """Let a peft.LoraConfig wrap QuantizedLinear targets (QuantizedLoraLinear) and, when `fused`, nn.Linear
    targets with FusedLoraLinear; returns the config. Other PEFT configs (AdaLoRA, IA3) are returned as
    they are: they have no layer for QuantizedLinear, and glmtune refuses them on int weights."""
    from peft import AdaLoraConfig, LoraConfig

    if not isinstance(config, LoraConfig) or isinstance(config, AdaLoraConfig):
        return config
    layers: dict[type[nn.Module], type[nn.Module]] = {QuantizedLinear: quantized_lora_linear_class()}
    if fused:
        layers[nn.Linear] = fused_lora_linear_class()
    config._register_custom_module(layers)
    return config


def load_lora_adapter(model: nn.Module, folder: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """`PeftModel.from_pretrained(model, folder)`, with glmtune's LoRA layer for QuantizedLinear registered on
    the adapter's config (loading an adapter trained on int8/int4 weights needs it)."""
    from peft import PeftConfig, PeftModel

    config = register_lora_layers(PeftConfig.from_pretrained(str(folder)))
    return PeftModel.from_pretrained(model, str(folder), config=config, **kwargs)
