"""FusedLoraLinear computes what PEFT's LoRA computes, trains the same tensors, and saves PEFT's format (the
LoRA layer for QuantizedLinear is tested with the quantized weights, tests/models/test_quantization.py)."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from glmtune.training.lora_layers import fused_lora_linear_class, register_lora_layers


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 40)
        self.down = nn.Linear(40, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def wrap(fused: bool, dtype=torch.float32, **lora):
    torch.manual_seed(0)
    model = TwoLayers().to(dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], **lora)
    if fused:
        register_lora_layers(config, fused=True)
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero B, so the update is not trivially zero
            nn.init.normal_(p, std=0.1)
    return peft_model


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}, {"lora_dropout": 0.0}])
def test_same_outputs_and_gradients_as_peft(lora):
    plain, fused = wrap(False, **lora), wrap(True, **lora)
    assert type(fused.base_model.model.up).__name__ == "FusedLoraLinear"
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(3, 5, 16)
    out_plain, out_fused = plain(x), fused(x)
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-5, atol=1e-6)
    out_plain.square().sum().backward()
    out_fused.square().sum().backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    for n, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_base_with_fp32_adapter_stays_bf16_and_close():
    plain, fused = wrap(False), wrap(True)
    fused.load_state_dict(plain.state_dict())
    for model in (plain, fused):
        for name, module in model.named_modules():
            if name.endswith(("up.base_layer", "down.base_layer")):
                module.to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    out = fused.base_model.model.up(x)
    assert out.dtype == torch.bfloat16
    reference = plain.base_model.model.up(x)
    torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2)


def bf16_base(model):
    for name, module in model.named_modules():
        if name.endswith(("up.base_layer", "down.base_layer")):
            module.to(torch.bfloat16)
    return model


def test_fp32_adapter_on_bf16_input_saves_the_bf16_input_only():
    """Without dropout, lora_A keeps the bf16 input for its backward (not an fp32 copy, twice the bytes) and
    computes exactly what the cast-then-linear path computes."""
    cast_copy, kept = bf16_base(wrap(True)), bf16_base(wrap(True))
    cast_copy.load_state_dict(kept.state_dict())
    for name, module in cast_copy.named_modules():  # a Dropout(0) takes the plain path: cast, then lora_A
        if name.endswith("lora_dropout"):
            module["default"] = nn.Dropout(0.0)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    layer = "up"
    outputs, grads, saved = {}, {}, {}
    for key, model in (("cast", cast_copy), ("kept", kept)):
        x_in = x.clone().requires_grad_()
        shapes = []

        def pack(t, shapes=shapes):
            shapes.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = getattr(model.base_model.model, layer)(x_in)
        out.float().square().sum().backward()
        outputs[key], saved[key] = out, shapes
        grads[key] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None} | {"x": x_in.grad}
    inputs = {
        key: {dtype for shape, dtype in shapes if math.prod(shape) == x.numel()}
        for key, shapes in saved.items()
    }
    assert torch.float32 in inputs["cast"]  # what PEFT's path keeps: the input cast to fp32
    assert inputs["kept"] == {torch.bfloat16}
    torch.testing.assert_close(outputs["kept"], outputs["cast"], rtol=0, atol=0)
    assert set(grads["kept"]) == set(grads["cast"]) and len(grads["kept"]) == 3  # lora_A, lora_B, x
    for name, grad in grads["cast"].items():
        assert grads["kept"][name].dtype == grad.dtype
        torch.testing.assert_close(grads["kept"][name], grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("half_base", [False, True])
def test_lora_dropout_applies_as_in_peft(half_base):
    """With lora_dropout, the fused layer drops the same inputs of lora_A as PEFT's (same seed), also where a
    bf16 base would otherwise let lora_A keep its input uncast."""
    plain, fused = wrap(False, lora_dropout=0.5), wrap(True, lora_dropout=0.5)
    fused.load_state_dict(plain.state_dict())
    if half_base:
        plain, fused = bf16_base(plain), bf16_base(fused)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16 if half_base else torch.float32)
    layer = {key: model.base_model.model.up for key, model in (("plain", plain), ("fused", fused))}
    outputs = {}
    for key, module in layer.items():
        torch.manual_seed(1)
        outputs[key] = module(x).float()
    tolerance = 2e-2 if half_base else 1e-5  # a bf16 base rounds the sum in bf16, PEFT's in fp32
    torch.testing.assert_close(outputs["fused"], outputs["plain"], rtol=tolerance, atol=tolerance)
    layer["fused"].eval()  # no dropout: a different output, so dropout did something above
    assert (layer["fused"](x).float() - outputs["plain"]).abs().max() > 10 * tolerance


def test_disabled_and_merged_adapters_fall_back():
    fused = wrap(True)
    torch.manual_seed(0)
    base = TwoLayers()  # the same initial weights wrap() started from
    x = torch.randn(2, 16)
    with fused.disable_adapter():
        torch.testing.assert_close(fused(x), base(x))
    assert not torch.allclose(fused(x), base(x))
    merged = copy.deepcopy(fused).merge_and_unload()
    torch.testing.assert_close(merged(x), fused(x), rtol=1e-5, atol=1e-6)


def test_saved_adapter_loads_into_plain_peft(tmp_path):
    fused = wrap(True)
    fused.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TwoLayers(), tmp_path)
    x = torch.randn(2, 16)
    torch.testing.assert_close(loaded(x), fused(x), rtol=1e-5, atol=1e-6)
    assert fused_lora_linear_class().__name__ == "FusedLoraLinear"
