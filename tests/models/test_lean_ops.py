"""lean_ops: ChatGLM2's RMSNorm and SwiGLU with autograd's outputs and gradients, bit for bit, keeping less."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._decomp import decomposition_table
from torch.utils._python_dispatch import TorchDispatchMode

from glmtune.models.lean_ops import rms_norm, swiglu


def published_rms_norm(x, weight, eps):
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    return (weight * (xf * torch.rsqrt(variance + eps))).to(x.dtype)


def published_swiglu(packed):
    gate, up = packed.chunk(2, dim=-1)
    return F.silu(gate) * up


def run(fn, inputs, grad):
    """Output, input gradients and the (shape, dtype) of every tensor autograd saved."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    saved = []

    def pack(t):
        saved.append((math.prod(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*leaves)
    out.backward(grad)
    return out, [t.grad for t in leaves], saved


def norm_inputs(dtype, train_weight):
    """An input, a weight near 1 (trained or not) and an upstream gradient, seeded."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 64, dtype=dtype, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(64)).to(dtype).requires_grad_(train_weight)
    return x, weight, torch.randn(3, 7, 64, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [False, True])
def test_rms_norm_matches_autograd_bit_for_bit(dtype, train_weight):
    x, weight, grad = norm_inputs(dtype, train_weight)
    ref_out, ref_grads, ref_saved = run(lambda a, w: published_rms_norm(a, w, 1e-5), [x, weight], grad)
    out, grads, saved = run(lambda a, w: rms_norm(a, w, 1e-5), [x, weight], grad)
    assert torch.equal(out, ref_out)
    assert ref_grads[0] is not None and (ref_grads[1] is not None) == train_weight
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == want.dtype and torch.equal(got, want)
    if dtype == torch.bfloat16:  # autograd keeps an fp32 copy of the input; rms_norm keeps the input
        assert (x.numel(), torch.float32) in ref_saved and (x.numel(), torch.float32) not in saved
    assert sum(n for n, _ in saved) < sum(n for n, _ in ref_saved)


class BackwardKernelByItsDecomposition(TorchDispatchMode):
    """Runs `aten._fused_rms_norm_backward` through PyTorch's reference decomposition of it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._fused_rms_norm_backward.default:
            return decomposition_table[func](*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [False, True])
def test_fused_rms_norm_kernels_match_the_published_ops(dtype, train_weight, monkeypatch):
    """The CUDA path (PyTorch's fused RMSNorm and its backward), run here through the same aten ops on the
    CPU: the published outputs, the gradients to fp32 rounding, and the same lean saved tensors."""
    import glmtune.models.lean_ops as lean_ops

    x, weight, grad = norm_inputs(dtype, train_weight)
    ref_out, ref_grads, _ = run(lambda a, w: published_rms_norm(a, w, 1e-5), [x, weight], grad)
    _, _, lean_saved = run(lambda a, w: rms_norm(a, w, 1e-5), [x, weight], grad)
    assert not lean_ops.use_fused_rms_norm(x, weight)  # on the CPU, the published ops
    calls = []

    def on_cuda(a, w):
        calls.append(1)
        return a.dtype == w.dtype

    monkeypatch.setattr(lean_ops, "use_fused_rms_norm", on_cuda)
    with BackwardKernelByItsDecomposition():  # the fused backward has a CUDA kernel only
        out, grads, saved = run(lambda a, w: rms_norm(a, w, 1e-5), [x, weight], grad)
    assert calls and torch.equal(out, ref_out)
    assert (grads[1] is not None) == train_weight
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for got, want in zip(grads, ref_grads):
        if want is not None:
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, **tolerance)
    assert saved == lean_saved  # the input, the weight and the per-token scale
    with torch.no_grad():
        assert torch.equal(rms_norm(x, weight, 1e-5), ref_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_autograd_bit_for_bit(dtype):
    torch.manual_seed(0)
    packed = torch.randn(3, 7, 40, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 7, 20, dtype=dtype)
    ref_out, [ref_grad], ref_saved = run(published_swiglu, [packed], grad)
    out, [got], saved = run(swiglu, [packed], grad)
    assert torch.equal(out, ref_out) and torch.equal(got, ref_grad)
    assert saved == [(packed.numel(), dtype)]  # the packed gate/up only: no silu(gate)
    assert (packed.numel() // 2, dtype) in ref_saved


def test_no_graph_without_gradients():
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert rms_norm(x, torch.ones(8), 1e-5).grad_fn is None
    assert swiglu(torch.randn(2, 8)).grad_fn is None
    assert torch.equal(rms_norm(x, torch.ones(8), 1e-5), published_rms_norm(x, torch.ones(8), 1e-5))
