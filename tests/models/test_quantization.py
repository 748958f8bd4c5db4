"""Int8 / int4 quantization in the published ChatGLM format, checked on the reference checkpoints' tensors.

The expected bytes are computed here independently of glmtune (numpy, the published formula written out:
scale = max|w| / (2^(b-1) - 1) in fp16, q = round-half-even(w / scale), int4: even column in the high nibble).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from glmtune.models.quantization import (
    QuantizedLinear,
    dequantize_weight,
    infer_quantization_bit,
    is_quantizable_weight,
    is_quantized_state_dict,
    pack_int4,
    quantize_model,
    quantize_state_dict,
    quantize_weight,
    unpack_int4,
)

BLOCK_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

# Measured on the reference checkpoints' weights (random N(0, 0.05) fp16, 64..368 wide), ||y_q - y|| / ||y||
# over random inputs: int8 <= 0.0070, int4 <= 0.1292 (theory: max|w| / qmax / sqrt(12) / std(w) ~ 0.6% / 11%).
INT8_REL_ERROR_BOUND = 0.01
INT4_REL_ERROR_BOUND = 0.16


# ---------------------------------------------------------------------------------------------------------
# Fixtures and independent reference computations
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v1_state_dict(reference_dir: Path) -> dict[str, torch.Tensor]:
    folder = reference_dir / "chatglm-6b-tiny"
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("pytorch_model-*.bin")):
        sd.update(torch.load(shard, weights_only=True))
    return sd


@pytest.fixture(scope="module")
def v2_state_dict(reference_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(reference_dir / "chatglm2-6b-tiny" / "model.safetensors")


@pytest.fixture(params=["v1", "v2"])
def family_state_dict(request, v1_state_dict, v2_state_dict) -> dict[str, torch.Tensor]:
    return {"v1": v1_state_dict, "v2": v2_state_dict}[request.param]


def published_quantize_numpy(weight: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The published formula in numpy float16 (numpy rounds fp16 ops like torch: compute in fp32, round)."""
    w = weight.numpy()
    assert w.dtype == np.float16
    scale = (np.abs(w).max(axis=1) / np.float16(2 ** (bits - 1) - 1)).astype(np.float16)
    q = np.round(w / scale[:, None]).astype(np.int8)  # np.round: half to even, like torch.round
    if bits == 8:
        return q, scale
    hi = q[:, 0::2].astype(np.uint8) & 0x0F
    lo = q[:, 1::2].astype(np.uint8) & 0x0F
    packed = ((hi << 4) | lo).astype(np.uint8).view(np.int8)
    return packed, scale


def block_weight_keys(sd: dict[str, torch.Tensor]) -> list[str]:
    return [
        k for k in sd if k.endswith(".weight") and k.rsplit(".", 2)[-2] in BLOCK_LINEARS and ".layers." in k
    ]


class Tree(nn.Module):
    """A stand-in module tree with exactly a checkpoint's names: 2-D `.weight`s become nn.Linear."""

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "Tree":
        root = cls()
        for key, tensor in sd.items():
            path, _, leaf = key.rpartition(".")
            module = root
            for part in path.split("."):
                if not hasattr(module, part):
                    module.add_module(part, cls())
                module = getattr(module, part)
            if leaf == "weight" and tensor.ndim == 2 and "embeddings" not in path:
                bias = sd.get(f"{path}.bias")
                linear = nn.Linear(
                    tensor.shape[1], tensor.shape[0], bias=bias is not None, dtype=tensor.dtype
                )
                parent_path, _, name = path.rpartition(".")
                root.get_submodule(parent_path).add_module(name, linear)
        for key, tensor in sd.items():
            path, _, leaf = key.rpartition(".")
            module = root.get_submodule(path)
            if not isinstance(module, nn.Linear):
                module.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=False))
        root.load_state_dict(sd)
        return root


# ---------------------------------------------------------------------------------------------------------
# Format: packing, published formula on the real tensors
# ---------------------------------------------------------------------------------------------------------


def test_unpack_pack_roundtrip_all_values():
    values = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(values, values).to(torch.int8)  # every (even, odd) column pair: [256, 2]
    packed = pack_int4(pairs)
    assert packed.shape == (256, 1) and packed.dtype == torch.int8
    assert torch.equal(unpack_int4(packed), pairs)
    # all 256 byte values occur exactly once, and unpack(pack()) also holds with batch dims
    assert torch.equal(
        torch.sort(packed.flatten().view(torch.uint8)).values, torch.arange(256, dtype=torch.uint8)
    )
    batched = pairs.reshape(4, 16, 8)
    assert torch.equal(unpack_int4(pack_int4(batched)), batched)


def test_nibble_order_and_sign():
    # even column -> high nibble, odd column -> low nibble, 4-bit two's complement
    q = torch.tensor([[-8, 7, 1, -1, 0, -3]], dtype=torch.int8)
    expected = [0x87, 0x1F, 0x0D]
    assert pack_int4(q).view(torch.uint8).tolist() == [expected]
    for byte in range(256):  # every byte decodes like the published int4WeightExtraction kernel
        hi, lo = byte >> 4, byte & 0x0F
        want = [hi - 16 if hi >= 8 else hi, lo - 16 if lo >= 8 else lo]
        got = unpack_int4(torch.tensor([byte], dtype=torch.uint8).view(torch.int8)).tolist()
        assert got == want, byte


def test_pack_rejects_odd_width():
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError):
        quantize_weight(torch.zeros(2, 3, dtype=torch.float16), 4)
    with pytest.raises(ValueError):
        quantize_weight(torch.zeros(2, 4, dtype=torch.float16), 3)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_state_dict_matches_published_formula(family_state_dict, bits):
    sd = family_state_dict
    quantized = quantize_state_dict(sd, bits)
    keys = block_weight_keys(sd)
    assert len(keys) == 8  # 2 layers x 4 linears
    assert set(quantized) == set(sd) | {k + "_scale" for k in keys}
    for key in keys:
        want_q, want_scale = published_quantize_numpy(sd[key], bits)
        q, scale = quantized[key], quantized[key + "_scale"]
        assert q.dtype == torch.int8 and scale.dtype == torch.float16
        out_features, in_features = sd[key].shape
        assert q.shape == (out_features, in_features * bits // 8)
        np.testing.assert_array_equal(q.numpy(), want_q, err_msg=key)
        np.testing.assert_array_equal(scale.numpy(), want_scale, err_msg=key)
        # each weight within half a step of its dequantized value (plus fp16 rounding of the quotient)
        err = (dequantize_weight(q, scale, bits, torch.float32) - sd[key].float()).abs()
        assert (err <= scale.float()[:, None] * (0.5 + 2**-5) + 1e-7).all(), key
    for key in set(sd) - set(keys):  # embeddings, norms, head, biases: untouched
        assert quantized[key] is sd[key]
    # one shard at a time gives the same tensors
    half = dict(list(sd.items())[: len(sd) // 2])
    for key, tensor in quantize_state_dict(half, bits).items():
        assert torch.equal(tensor, quantized[key])


def test_block_key_matching():
    assert is_quantizable_weight("transformer.layers.3.attention.query_key_value.weight")
    assert is_quantizable_weight("transformer.encoder.layers.0.self_attention.dense.weight")
    assert is_quantizable_weight("transformer.encoder.layers.27.mlp.dense_4h_to_h.weight")
    assert not is_quantizable_weight("transformer.encoder.layers.0.self_attention.dense.bias")
    assert not is_quantizable_weight("transformer.output_layer.weight")
    assert not is_quantizable_weight("lm_head.weight")
    assert not is_quantizable_weight("transformer.prefix_encoder.trans.0.weight")
    assert not is_quantizable_weight("transformer.layers.0.attention.query_key_value.base_layer.weight")


def test_zero_row_quantizes_to_zero():
    w = torch.zeros(3, 8, dtype=torch.float16)
    w[1] = torch.linspace(-1, 1, 8)
    for bits in (8, 4):
        q, scale = quantize_weight(w, bits)
        deq = dequantize_weight(q, scale, bits)
        assert torch.isfinite(deq).all() and (deq[0] == 0).all() and (deq[2] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, bound", [(8, INT8_REL_ERROR_BOUND), (4, INT4_REL_ERROR_BOUND)])
def test_quantized_linear_error_vs_float(family_state_dict, bits, bound):
    sd = family_state_dict
    torch.manual_seed(0)
    for key in block_weight_keys(sd):
        prefix = key[: -len(".weight")]
        bias = sd.get(prefix + ".bias")
        linear = nn.Linear(sd[key].shape[1], sd[key].shape[0], bias=bias is not None, dtype=torch.float16)
        linear.load_state_dict({"weight": sd[key]} | ({"bias": bias} if bias is not None else {}))
        layer = QuantizedLinear.from_linear(linear, bits)
        x = torch.randn(4, 16, linear.in_features)
        y_float = F.linear(x, linear.weight.float(), None if bias is None else bias.float())
        y = layer(x)
        assert y.dtype == torch.float32 and y.shape == y_float.shape
        rel = ((y - y_float).norm() / y_float.norm()).item()
        assert rel < bound, (key, rel)
        # and it is exactly the dequantized linear
        y_deq = F.linear(x, layer.dequantized_weight(torch.float32), None if bias is None else bias.float())
        torch.testing.assert_close(y, y_deq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_gradient_flows_to_input_only(bits):
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(32, 24).half(), bits)
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(2, 5, 32, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    w = layer.dequantized_weight(torch.float32)
    (F.linear(x_ref, w, layer.bias.float()) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_in_activation_dtype(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(32, 16).half()
    for bits in (8, 4):
        layer = QuantizedLinear.from_linear(linear, bits)
        x = torch.randn(3, 32)
        y = layer(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("bits", [8, 4])
def test_layer_state_dict_roundtrip(bits):
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(32, 16).half(), bits)
    sd = layer.state_dict()
    assert list(sd) == ["weight", "weight_scale", "bias"]
    assert sd["weight"].shape == (16, 32 * bits // 8) and sd["weight"].dtype == torch.int8
    assert sd["weight_scale"].shape == (16,) and sd["weight_scale"].dtype == torch.float16
    assert list(QuantizedLinear(32, 16, bits, bias=False).state_dict()) == ["weight", "weight_scale"]

    fresh = QuantizedLinear(32, 16, bits)
    fresh.load_state_dict(sd)
    on_meta = QuantizedLinear(32, 16, bits, device="meta")
    on_meta.load_state_dict(sd, assign=True)
    x = torch.randn(3, 32)
    for other in (fresh, on_meta):
        assert torch.equal(other(x), layer(x))
        assert not any(p.requires_grad for p in other.parameters())


# ---------------------------------------------------------------------------------------------------------
# Models and checkpoints
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_model_matches_quantize_state_dict(family_state_dict, bits):
    sd = family_state_dict
    model = quantize_model(Tree.from_state_dict(sd), bits)
    quantized = quantize_state_dict(sd, bits)
    model_sd = model.state_dict()
    assert set(model_sd) == set(quantized)
    for key, tensor in quantized.items():
        assert torch.equal(model_sd[key], tensor), key
    block_modules = {k[: -len(".weight")] for k in block_weight_keys(sd)}
    for name, module in model.named_modules():
        assert isinstance(module, QuantizedLinear) == (name in block_modules), name
    head = "lm_head" if "lm_head.weight" in sd else "transformer.output_layer"
    assert type(model.get_submodule(head)) is nn.Linear

    # a checkpoint that is already quantized: empty quantized layers (even on meta), then load
    skeleton = quantize_model(Tree.from_state_dict(sd).to("meta"), bits, empty_init=True)
    skeleton.load_state_dict(quantized, assign=True)
    for key, tensor in skeleton.state_dict().items():
        assert torch.equal(tensor, quantized[key]), key


def test_quantize_model_options():
    model = Tree.from_state_dict(
        {
            "transformer.layers.0.attention.query_key_value.weight": torch.randn(12, 4),
            "transformer.layers.0.attention.dense.weight": torch.randn(4, 4),
            "lm_head.weight": torch.randn(10, 4),
        }
    )
    model.config = type("Config", (), {"quantization_bit": 0})()
    quantize_model(model, 8, family_layer_names=["query_key_value"])
    assert isinstance(model.get_submodule("transformer.layers.0.attention.query_key_value"), QuantizedLinear)
    assert type(model.get_submodule("transformer.layers.0.attention.dense")) is nn.Linear
    assert model.config.quantization_bit == 8
    with pytest.raises(ValueError):
        quantize_model(nn.Sequential(nn.Linear(2, 2)), 4)


@pytest.mark.parametrize("bits", [8, 4])
def test_compute_dtype(v2_state_dict, bits):
    key = "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"
    weight = v2_state_dict[key]
    want_q, want_scale = published_quantize_numpy(weight, bits)
    q, scale = quantize_weight(weight.float(), bits, torch.float16)  # fp32 in, published fp16 arithmetic
    np.testing.assert_array_equal(q.numpy(), want_q)
    np.testing.assert_array_equal(scale.numpy(), want_scale)
    q32, scale32 = quantize_weight(weight.float(), bits)  # fp32 arithmetic: a fp32 scale, close not equal
    assert scale32.dtype == torch.float32
    torch.testing.assert_close(scale32.half(), scale)
    assert torch.equal(quantize_state_dict({key: weight.float()}, bits, dtype=torch.float16)[key], q)

    # a float32 skeleton on meta (the loader's way): dtype sets the scale / bias dtype, nothing is computed
    sd = {k: v for k, v in v2_state_dict.items() if ".layers.1." in k}
    skeleton = Tree.from_state_dict(sd).float().to("meta")
    quantize_model(skeleton, bits, dtype=torch.float16)
    qkv = skeleton.get_submodule("transformer.encoder.layers.1.self_attention.query_key_value")
    assert isinstance(qkv, QuantizedLinear) and qkv.weight.is_meta
    assert qkv.weight.dtype == torch.int8 and qkv.weight_scale.dtype == qkv.bias.dtype == torch.float16


@pytest.mark.parametrize("bits", [8, 4])
def test_detect_quantized_checkpoint(family_state_dict, bits):
    sd = family_state_dict
    quantized = quantize_state_dict(sd, bits)
    assert not is_quantized_state_dict(sd) and is_quantized_state_dict(quantized)
    assert is_quantized_state_dict(quantized.keys())
    assert infer_quantization_bit(sd) == 0
    assert infer_quantization_bit(quantized) == bits  # from shapes: hidden from the norms / embeddings
    qkv_only = {k: v for k, v in quantized.items() if "query_key_value" in k}
    config = type("Config", (), {"quantization_bit": 0, "hidden_size": 64})()
    assert infer_quantization_bit(qkv_only, config) == bits  # hidden from the config
    config.quantization_bit = bits
    assert infer_quantization_bit({}, config) == bits
    with pytest.raises(ValueError):
        infer_quantization_bit(qkv_only)


# ---------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_matches_cpu(v2_state_dict, bits):
    key = "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"
    weight = v2_state_dict[key]
    q_cpu, s_cpu = quantize_weight(weight, bits)
    q_gpu, s_gpu = quantize_weight(weight.cuda(), bits)
    assert torch.equal(q_gpu.cpu(), q_cpu) and torch.equal(s_gpu.cpu(), s_cpu)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float16)
    linear.weight.data.copy_(weight)
    layer = QuantizedLinear.from_linear(linear, bits)
    x = torch.randn(8, weight.shape[1])
    x_cpu = x.clone().requires_grad_(True)
    y_cpu = layer(x_cpu)
    y_cpu.pow(2).sum().backward()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x_gpu = x.to("cuda", dtype).requires_grad_(True)
        y = layer.cuda()(x_gpu)
        y.float().pow(2).sum().backward()
        assert y.dtype == dtype
        torch.testing.assert_close(y.float().cpu(), y_cpu.detach(), rtol=0.02, atol=0.02)
        # The input gradient goes through the same dequantized weights as on the CPU.
        scale = float(x_cpu.grad.abs().max())
        torch.testing.assert_close(x_gpu.grad.float().cpu(), x_cpu.grad, rtol=0.05, atol=0.02 * scale)
        layer.cpu()
