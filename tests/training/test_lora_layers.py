"""glmtune's LoRA layers: FusedLoraLinear computes what PEFT's LoRA computes, trains the same tensors, and saves
PEFT's format; QuantizedLoraLinear trains LoRA beside int8 / int4 weights and reloads."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from glmtune.models.quantization import quantize_model
from glmtune.training.lora_layers import (
    fused_lora_linear_class,
    load_lora_adapter,
    quantized_lora_linear_class,
    register_lora_layers,
)


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


# ---------------------------------------------------------------------------------------------------------
# QuantizedLoraLinear: LoRA on glmtune's int8 / int4 weights
# ---------------------------------------------------------------------------------------------------------

BLOCK_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


class TinyBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.attention.dense = nn.Linear(hidden, hidden)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = nn.Linear(hidden, 4 * hidden)
        self.mlp.dense_4h_to_h = nn.Linear(4 * hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attention.query_key_value(h).chunk(3, dim=-1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.attention.dense(att)
        return h + self.mlp.dense_4h_to_h(F.gelu(self.mlp.dense_h_to_4h(h)))


class TinyLM(nn.Module):
    """Stand-in with ChatGLM-6B's module names (transformer.layers.N.attention.query_key_value, ...)."""

    def __init__(self, vocab: int = 50, hidden: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.word_embeddings = nn.Embedding(vocab, hidden)
        self.transformer.layers = nn.ModuleList(TinyBlock(hidden) for _ in range(layers))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.transformer.word_embeddings(input_ids)
        for layer in self.transformer.layers:
            h = layer(h)
        return self.lm_head(h)


def quantized_tiny_lm(bits: int) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM().half()
    quantize_model(model, bits)
    return model.float()  # like an fp32 CPU run: norms/embeddings/head in fp32, int weights untouched


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_trains_on_quantized_layers(bits, tmp_path):
    model = quantized_tiny_lm(bits)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(BLOCK_LINEARS), lora_dropout=0.0)
    plain = LoraConfig(target_modules=list(BLOCK_LINEARS))
    with pytest.raises(ValueError, match="not supported"):  # PEFT alone cannot wrap the custom layer
        get_peft_model(quantized_tiny_lm(bits), plain)
    peft_model = get_peft_model(model, register_lora_layers(config))

    lora_cls = quantized_lora_linear_class()
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, lora_cls)]
    assert len(wrapped) == 8
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = lm_loss(peft_model, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses

    # base weights (int + scale + bias) did not move; lora_B moved away from its zero init
    peft_model.eval()
    base_now = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in peft_model.state_dict().items()
        if "lora_" not in k
    }
    assert set(base_now) == set(base)
    for key, tensor in base.items():
        assert torch.equal(base_now[key], tensor), key
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    with pytest.raises(NotImplementedError):
        peft_model.merge_and_unload()

    # save the adapter, load it onto a fresh quantized model: same outputs
    with torch.no_grad():
        expected = peft_model(ids)
    peft_model.save_pretrained(tmp_path)
    reloaded = load_lora_adapter(quantized_tiny_lm(bits), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), expected)


def test_lora_layers_register_on_one_config_only(tmp_path):
    """The LoRA layer for QuantizedLinear is registered on the config that creates the adapter, not on every
    LoraConfig of the process; a saved adapter loads through load_lora_adapter, which registers it again."""
    config = register_lora_layers(LoraConfig(r=2, target_modules=["query_key_value"]))
    assert LoraConfig(target_modules=["dense"])._custom_modules is None
    model = get_peft_model(quantized_tiny_lm(4), config)
    assert sum(isinstance(m, quantized_lora_linear_class()) for m in model.modules()) == 2
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    reloaded = load_lora_adapter(quantized_tiny_lm(4), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), model(ids))
    with pytest.raises(ValueError):  # DoRA needs the float base weight
        dora = register_lora_layers(LoraConfig(target_modules=["dense"], use_dora=True))
        get_peft_model(quantized_tiny_lm(4), dora)
