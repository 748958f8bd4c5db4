"""Int8 / int4 weight-only quantization of ChatGLM's block linears, in the published THUDM format.

The published `quantization.py` of ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B replaces the four linear layers of
every block (`query_key_value`, `dense`, `dense_h_to_4h`, `dense_4h_to_h`) by a `QuantizedLinear` holding

    weight        int8 [out, in]       (8 bits)
                  int8 [out, in // 2]  (4 bits: two 4-bit two's complement values per byte, even column in the
                                        HIGH nibble, odd column in the low nibble)
    weight_scale  [out], in the weight's (half) dtype
    bias          [out] or absent

with symmetric per-output-row scales: scale = max|w| / (2^(b-1) - 1), q = round(w / scale), w ~= q * scale.
The embeddings, the final norm and the output head stay in float, as published.

Everything here is plain torch, so it runs (and trains LoRA / P-Tuning v2 on top; the LoRA layer for
QuantizedLinear is in glmtune.training.lora_layers) on CPU as well as on CUDA.
The published code dequantizes with CUDA kernels that ship as a compiled blob inside THUDM's file; we do not
copy that blob, the torch path below is a handful of elementwise ops and runs on the GPU just the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

QuantBits = Literal[4, 8]

# Last name component of the four linears of every block, in both families:
# v1: transformer.layers.N.attention.{query_key_value,dense}, transformer.layers.N.mlp.{dense_h_to_4h,dense_4h_to_h}
# v2/v3: transformer.encoder.layers.N.self_attention.{query_key_value,dense}, ...mlp.{dense_h_to_4h,dense_4h_to_h}
QUANTIZED_LAYER_NAMES: tuple[str, ...] = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"weight bit width must be 4 or 8, got {bits}")


def _block_linear_pattern(layer_names: Sequence[str]) -> re.Pattern[str]:
    """Module names `...layers.<N>.<anything>.<one of layer_names>`: a block's linear, not lm_head & co."""
    names = "|".join(re.escape(n) for n in layer_names)
    return re.compile(rf"(?:^|\.)layers\.\d+\.(?:[\w.]+\.)?(?:{names})$")


# ---------------------------------------------------------------------------------------------------------
# Tensor-level format
# ---------------------------------------------------------------------------------------------------------


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] two per byte along the last dim: [..., 2k] -> [..., k] int8.

    Byte j holds column 2j in its high nibble and column 2j+1 in its low nibble (4-bit two's complement),
    the layout of the published `compress_int4_weight` kernel.
    """
    if values.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 values, got {values.dtype}")
    if values.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(values.shape)}")
    # Shift in int16 so `hi << 4` cannot overflow; the packed value always fits int8 again.
    hi = values[..., 0::2].to(torch.int16)
    lo = values[..., 1::2].to(torch.int16)
    return ((hi << 4) | (lo & 0x0F)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: [..., k] int8 -> [..., 2k] int8 values in [-8, 7]."""
    if packed.dtype != torch.int8:
        raise TypeError(f"unpack_int4 expects int8, got {packed.dtype}")
    hi = packed >> 4  # arithmetic shift of a signed byte: sign-extends the high nibble
    lo = ((packed & 0x0F) ^ 0x08) - 0x08  # sign-extend the low nibble: 0..7 -> 0..7, 8..15 -> -8..-1
    return torch.stack((hi, lo), dim=-1).flatten(-2)


def quantize_weight(
    weight: torch.Tensor, bits: QuantBits, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [out, in] -> (packed int8 weight, scale [out] in `dtype`), the published formula.

    The arithmetic runs in `dtype` (default: the weight's own dtype), as the published code runs it in the
    model's dtype. Quantizing fp16 weights in fp16 gives the bytes of THUDM's int8/int4 releases; doing the
    division in fp32 instead changes about 1% of the int8 values (the fp16 quotient rounds differently).
    """
    _check_bits(bits)
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
    if bits == 4 and weight.shape[1] % 2:
        raise ValueError(f"int4 packing needs an even number of input features, got {weight.shape[1]}")
    weight = weight.detach().to(dtype or weight.dtype)
    qmax = 2 ** (bits - 1) - 1  # 127 or 7: symmetric, -128 / -8 are never produced
    scale = weight.abs().amax(dim=1) / qmax
    # An all-zero row has scale 0 (the published code would divide 0 by 0); it quantizes to zeros.
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    # The clamp is a no-op for normal weights; it only guards against subnormal fp16 scales wrapping int8.
    q = torch.round(weight / divisor[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    if bits == 4:
        q = pack_int4(q)
    return q, scale


def dequantize_weight(
    qweight: torch.Tensor, scale: torch.Tensor, bits: QuantBits, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Packed int8 weight + scale -> float [out, in] in `dtype` (default: the scale's dtype)."""
    _check_bits(bits)
    dtype = dtype or scale.dtype
    q = unpack_int4(qweight) if bits == 4 else qweight
    # In place: one float copy of the weight at a time (on ChatGLM-6B's MLP, 128 MiB less at the peak).
    return q.to(dtype, copy=True).mul_(scale.to(dtype)[:, None])


# ---------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------


class _QuantizedMatmul(torch.autograd.Function):
    """y = x @ dequant(W)^T that keeps only the int weight for backward.

    F.linear on a dequantized weight would make autograd keep every layer's float weight alive until the
    backward pass, i.e. the whole float model during LoRA / P-Tuning training. Like the published W8A16Linear
    we save the packed weight and dequantize again in backward. Only the input gets a gradient.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int
    ) -> torch.Tensor:
        ctx.save_for_backward(qweight, scale)
        ctx.bits = bits
        return F.linear(x, dequantize_weight(qweight, scale, bits, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        qweight, scale = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            # dL/dx = dL/dy @ W, with W: [out, in]
            grad_input = grad_output @ dequantize_weight(qweight, scale, ctx.bits, grad_output.dtype)
        return grad_input, None, None, None


class QuantizedLinear(nn.Module):
    """A frozen linear layer with int8 or packed-int4 weights (state dict: weight, weight_scale, bias)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_bit_width: QuantBits,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_bits(weight_bit_width)
        if weight_bit_width == 4 and in_features % 2:
            raise ValueError(f"int4 packing needs an even number of input features, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight_bit_width = weight_bit_width
        # Parameters, not buffers, as published; ints cannot require grad, and the float ones stay frozen.
        packed_in = in_features * weight_bit_width // 8
        self.weight = nn.Parameter(
            torch.zeros(out_features, packed_in, dtype=torch.int8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: QuantBits, dtype: torch.dtype | None = None
    ) -> QuantizedLinear:
        """Quantize an nn.Linear, computing in and storing scale and bias as `dtype` (default: its own).

        A linear on the meta device gives an empty layer on meta (nothing to quantize yet).
        """
        dtype = dtype or linear.weight.dtype
        has_bias = linear.bias is not None
        if linear.weight.is_meta:
            return cls(
                linear.in_features, linear.out_features, bits, bias=has_bias, dtype=dtype, device="meta"
            )
        # allocate nothing; the real tensors are set just below
        layer = cls(linear.in_features, linear.out_features, bits, bias=has_bias, dtype=dtype, device="meta")
        qweight, scale = quantize_weight(linear.weight, bits, dtype)
        layer.weight = nn.Parameter(qweight, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        if has_bias:
            layer.bias = nn.Parameter(linear.bias.detach().to(dtype, copy=True), requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out, in] this layer computes with."""
        return dequantize_weight(self.weight, self.weight_scale, self.weight_bit_width, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _QuantizedMatmul.apply(x, self.weight, self.weight_scale, self.weight_bit_width)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_bit_width={self.weight_bit_width}, bias={self.bias is not None}"
        )


# ---------------------------------------------------------------------------------------------------------
# Whole models and checkpoints
# ---------------------------------------------------------------------------------------------------------


def quantize_model(
    model: nn.Module,
    bits: QuantBits,
    *,
    family_layer_names: Sequence[str] | None = None,
    empty_init: bool = False,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace the block linears (`layers.N.*.{query_key_value,dense,dense_h_to_4h,dense_4h_to_h}`) in place.

    Each float weight is dropped as soon as its layer is replaced, so peak memory is one layer above the
    quantized model. With `empty_init=True` (implied for linears on the meta device) nothing is computed:
    the layers get empty int8 weights of the right shapes on the old weight's device, ready for
    `load_state_dict` of a quantized checkpoint. `dtype` is the compute / scale / bias dtype (default: each
    linear's own). Sets `model.config.quantization_bit` when the model has a config.
    """
    _check_bits(bits)
    pattern = _block_linear_pattern(family_layer_names or QUANTIZED_LAYER_NAMES)
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and pattern.search(name)
    ]
    if not targets:
        raise ValueError(
            "quantize_model found no block linears (`layers.N.<...>.query_key_value` etc.) to replace"
        )
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear: nn.Linear = getattr(parent, child_name)
        if empty_init:
            new = QuantizedLinear(
                linear.in_features,
                linear.out_features,
                bits,
                bias=linear.bias is not None,
                dtype=dtype or linear.weight.dtype,
                device=linear.weight.device,
            )
        else:
            new = QuantizedLinear.from_linear(linear, bits, dtype)
        setattr(parent, child_name, new)
        del linear  # the float weight goes with the last reference to the old module
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization_bit = bits
    return model


def is_quantizable_weight(key: str, layer_names: Sequence[str] | None = None) -> bool:
    """Whether a state-dict key is the `.weight` of a block linear that the published format quantizes."""
    if not key.endswith(".weight"):
        return False
    return (
        _block_linear_pattern(layer_names or QUANTIZED_LAYER_NAMES).search(key[: -len(".weight")]) is not None
    )


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    bits: QuantBits,
    *,
    layer_names: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Float checkpoint tensors -> the published quantized layout (`weight` packed + `weight_scale`).

    Works one tensor at a time and on any subset of the keys, so a loader can convert shard by shard without
    ever holding the float model. Non-block tensors (embeddings, norms, head, biases) pass through unchanged,
    as do block weights whose `weight_scale` is already present (an already quantized shard). `dtype`: see
    `quantize_weight` (default: each tensor's own, fp16 for the published checkpoints).
    """
    _check_bits(bits)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        prefix = key[: -len(".weight")]
        if (
            is_quantizable_weight(key, layer_names)
            and tensor.is_floating_point()
            and f"{prefix}.weight_scale" not in state_dict
        ):
            out[key], out[f"{prefix}.weight_scale"] = quantize_weight(tensor, bits, dtype)
        else:
            out[key] = tensor
    return out


def is_quantized_state_dict(keys: Iterable[str]) -> bool:
    """Whether a checkpoint (a state dict, or just its keys) already holds packed weights (`*.weight_scale`)."""
    return any(k.endswith(".weight_scale") for k in keys)


def infer_quantization_bit(state_dict: Mapping[str, torch.Tensor], config: Any | None = None) -> int:
    """Bit width of a quantized checkpoint: `config.quantization_bit` if set, else from the tensor shapes.

    A `query_key_value.weight` has hidden_size columns at 8 bits and hidden_size / 2 at 4 bits; hidden_size
    comes from `config.hidden_size` or from a norm / embedding tensor of the same state dict. Returns 0 for a
    float checkpoint. Tensors only need a `.shape` (safetensors slices or meta tensors do).
    """
    bits = getattr(config, "quantization_bit", 0) if config is not None else 0
    if bits:
        _check_bits(bits)
        return bits
    if not is_quantized_state_dict(state_dict):
        return 0
    hidden = getattr(config, "hidden_size", None) if config is not None else None
    if hidden is None:
        for key, tensor in state_dict.items():
            if key.endswith(("input_layernorm.weight", "final_layernorm.weight")):
                hidden = tensor.shape[0]
                break
            if key.endswith("word_embeddings.weight"):
                hidden = tensor.shape[1]
                break
    qkv = next(
        (
            t
            for k, t in state_dict.items()
            if k.endswith("query_key_value.weight") and k + "_scale" in state_dict
        ),
        None,
    )
    if hidden is None or qkv is None:
        raise ValueError(
            "cannot infer the quantization bit width from this state dict; pass a config with "
            "quantization_bit or hidden_size"
        )
    columns = qkv.shape[1]
    if columns == hidden:
        return 8
    if 2 * columns == hidden:
        return 4
    raise ValueError(
        f"query_key_value.weight has {columns} columns, neither hidden_size {hidden} nor half of it"
    )
