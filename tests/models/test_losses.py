"""Chunked LM loss: the same loss and gradients as full fp32 logits, whatever the chunk size."""

import pytest
import torch

from glmtune.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmtune.models.losses import chunked_causal_lm_loss


def tiny_model() -> ChatGLM2ForConditionalGeneration:
    torch.manual_seed(0)
    config = ChatGLM2Config(
        num_layers=2,
        hidden_size=48,
        num_attention_heads=4,
        kv_channels=12,
        multi_query_attention=True,
        multi_query_group_num=2,
        ffn_hidden_size=96,
        padded_vocab_size=211,
    )
    return ChatGLM2ForConditionalGeneration(config).train()


def loss_and_grads(model, chunk, ids, labels):
    model.zero_grad()
    model.loss_chunk_size = chunk
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out, out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_loss_equals_full_logits(chunk):
    model = tiny_model()
    ids = torch.randint(0, 211, (3, 13))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 9:] = -100  # padding at the end of one row
    full_out, full, full_grads = loss_and_grads(model, 0, ids, labels)
    chunked_out, chunked, grads = loss_and_grads(model, chunk, ids, labels)
    assert full_out.logits is not None and chunked_out.logits is None
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_no_supervised_token_gives_nan_like_mean_cross_entropy():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    head = torch.nn.Linear(8, 10, bias=False)
    loss = chunked_causal_lm_loss(hidden, head, torch.full((1, 4), -100))
    assert torch.isnan(loss)


def test_selective_checkpointing_keeps_loss_and_grads():
    model = tiny_model()
    ids = torch.randint(0, 211, (2, 11))
    _, plain, plain_grads = loss_and_grads(model, 0, ids, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for recomputed in (0, 1, None):
        model.transformer.encoder.checkpoint_layers = recomputed
        _, loss, grads = loss_and_grads(model, 0, ids, ids)
        torch.testing.assert_close(loss, plain)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, msg=name)


def frozen_head_grads(model, chunk, ids, labels):
    """Loss and gradients with the output layer frozen (as LoRA leaves it), and how often it was called."""
    calls = []
    hook = model.transformer.output_layer.register_forward_hook(lambda *_: calls.append(1))
    model.transformer.output_layer.weight.requires_grad_(False)
    try:
        _, loss, grads = loss_and_grads(model, chunk, ids, labels)
    finally:
        hook.remove()
    return loss, grads, len(calls)


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_frozen_head_loss_computes_its_gradient_in_the_forward(chunk):
    """With a frozen plain output layer, each chunk's gradient is computed with its loss (the layer's module is
    not called, and not called again in the backward), and loss and gradients equal full fp32 logits'."""
    model = tiny_model()
    ids = torch.randint(0, 211, (3, 13))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 9:] = -100
    full, full_grads, full_calls = frozen_head_grads(model, 0, ids, labels)
    fused, grads, calls = frozen_head_grads(model, chunk, ids, labels)
    assert full_calls == 1 and calls == 0
    assert "transformer.output_layer.weight" not in grads and grads.keys() == full_grads.keys()
    torch.testing.assert_close(fused, full, rtol=1e-6, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_frozen_head_loss_in_bf16_and_scaled():
    """bf16 weights and a loss scaled before the backward (gradient accumulation): the same gradients as
    autograd's through bf16 logits, to bf16 rounding."""
    model = tiny_model().to(torch.bfloat16)
    model.transformer.output_layer.weight.requires_grad_(False)
    ids = torch.randint(0, 211, (2, 16))
    results = []
    for chunk in (0, 7):
        model.zero_grad()
        model.loss_chunk_size = chunk
        loss = model(input_ids=ids, labels=ids).loss
        (loss / 4).backward()
        results.append(
            (loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
        )
    (full, full_grads), (fused, grads) = results
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, full.float(), rtol=1e-2, atol=1e-2)
    for name, grad in full_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=2e-2, atol=1e-3, msg=name)


def test_trained_or_wrapped_heads_recompute_their_logits():
    """A trained output layer (or one an adapter wraps) needs its own gradient: the module is called per chunk,
    and again in the backward."""
    model = tiny_model()
    ids = torch.randint(0, 211, (2, 9))
    calls = []
    model.transformer.output_layer.register_forward_hook(lambda *_: calls.append(1))
    _, _, grads = loss_and_grads(model, 5, ids, ids)
    assert grads["transformer.output_layer.weight"] is not None
    assert len(calls) == 2 * 4  # 16 scored tokens in chunks of 5, each recomputed


def test_frozen_head_under_fp16_autocast_recomputes_its_logits():
    """fp16 mixed precision scales the loss before the backward (small gradients would underflow fp16): the
    gradient cannot be computed, in fp16, before that scale is known."""
    model = tiny_model()
    model.transformer.output_layer.weight.requires_grad_(False)
    model.loss_chunk_size = 5
    calls = []
    model.transformer.output_layer.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 211, (2, 9))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert len(calls) == 2 * 4 and torch.isfinite(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2 * 4  # bf16 autocast: the gradient is computed with the loss
