"""RMSNorm and SwiGLU that keep less for the backward than autograd does, with the same numbers.

Autograd saves every intermediate its backward formulas name. For ChatGLM2's RMSNorm (computed in fp32 on
half-precision activations) that is the fp32 copy of the input, twice the bytes of the input itself; for
SwiGLU, `silu(gate)` beside the gate/up tensor it came from. Each function here runs the published forward
ops unchanged, saves only the input (and RMSNorm's per-token scale), and in the backward recomputes the rest
and applies the ops autograd would apply, in the same order, so the gradients are bit for bit autograd's.
On a ChatGLM2-6B block that is 52 KB a token less to keep (bench/block_costs.py).

On CUDA, RMSNorm runs PyTorch's fused kernels (`aten._fused_rms_norm` and its backward: one pass over the
activation each way, where the published ops make about ten over its fp32 copies). Same formula in fp32,
but the CUDA kernels sum the squares in their own order, so results may differ from the published ops in
the last bit of an fp32 sum; on the CPU, where the golden tests run, the published ops are used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The published forward; also returns the per-token scale 1 / sqrt(mean(x^2) + eps)."""
    xf = x.float()
    scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * (xf * scale)).to(x.dtype), scale


def use_fused_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether RMSNorm runs PyTorch's fused kernels: on CUDA, with the weight in the input's dtype (a trained
    fp32 weight on half-precision input keeps the published mixed-dtype product)."""
    return x.is_cuda and x.dtype == weight.dtype and hasattr(torch.ops.aten, "_fused_rms_norm")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool) -> torch.Tensor:
        if fused:
            # (output, per-token 1 / sqrt(mean(x^2) + eps) in fp32), as _rms_norm returns them
            out, scale = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        else:
            out, scale = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, scale)
        ctx.fused = fused
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, scale = ctx.saved_tensors
        if ctx.fused:
            grad_x, grad_weight = torch.ops.aten._fused_rms_norm_backward(
                grad, x, [x.shape[-1]], scale, weight, [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
            )
            return grad_x, grad_weight, None, None
        xf = x.float()
        grad = grad.float()  # backward of the final cast
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = xf * scale
            dims = tuple(range(grad.dim() - weight.dim()))
            grad_weight = (grad * normed).sum(dims).to(weight.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None, None
        grad_normed = grad * weight  # weight * normed
        grad_x = grad_normed * scale  # xf * scale, towards xf
        grad_scale = (grad_normed * xf).sum(-1, keepdim=True)  # ... towards scale
        grad_variance = -0.5 * grad_scale * scale.pow(3)  # rsqrt
        grad_squares = grad_variance.expand_as(xf) / xf.shape[-1]  # mean
        grad_x = grad_x + grad_squares * (2 * xf)  # pow(2)
        return grad_x.to(x.dtype), grad_weight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`(weight * x / sqrt(mean(x^2) + eps)).to(x.dtype)`, in fp32: ChatGLM2's published RMSNorm."""
    fused = use_fused_rms_norm(x, weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps, fused)
    if fused:
        return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)[0]
    return _rms_norm(x, weight, eps)[0]


def _swiglu(packed: torch.Tensor) -> torch.Tensor:
    gate, up = packed.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, packed: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(packed)
        return _swiglu(packed)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (packed,) = ctx.saved_tensors
        gate, up = packed.chunk(2, dim=-1)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        grad_up = grad * F.silu(gate)
        return torch.cat([grad_gate, grad_up], dim=-1)


def swiglu(packed: torch.Tensor) -> torch.Tensor:
    """`silu(first half) * second half` of the last dimension: ChatGLM2's MLP activation."""
    if torch.is_grad_enabled() and packed.requires_grad:
        return _SwiGLU.apply(packed)
    return _swiglu(packed)
