"""Chunked LM loss: the same loss and gradients as full fp32 logits, whatever the chunk size.

The chunked loss reads the model's last hidden state (`output_hidden_states`, logits for the last position
only), as glmtune.training.module.CausalLMModule.loss does; chunk 0 below is the model's own loss from the
logits of every position, as published."""

import pytest
import torch
from torch.utils.hooks import RemovableHandle

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


def lm_loss(model, chunk, ids, labels) -> torch.Tensor:
    """Chunk 0: the model's own loss, from the logits of every position; else the chunked loss."""
    if chunk == 0:
        return model(input_ids=ids, labels=labels).loss
    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    return chunked_causal_lm_loss(out.hidden_states[-1], model.get_output_embeddings(), labels, chunk)


def loss_and_grads(model, chunk, ids, labels):
    model.zero_grad()
    loss = lm_loss(model, chunk, ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def count_chunk_calls(head: torch.nn.Module) -> tuple[list[int], RemovableHandle]:
    """Calls of `head` on a chunk of scored tokens ([n, h]), not the model's own call on [b, s, h]."""
    calls: list[int] = []
    handle = head.register_forward_hook(lambda _, args, __: calls.append(1) if args[0].dim() == 2 else None)
    return calls, handle


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_loss_equals_full_logits(chunk):
    model = tiny_model()
    ids = torch.randint(0, 211, (3, 13))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 9:] = -100  # padding at the end of one row
    full, full_grads = loss_and_grads(model, 0, ids, labels)
    chunked, grads = loss_and_grads(model, chunk, ids, labels)
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
    plain, plain_grads = loss_and_grads(model, 0, ids, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for recomputed in (0, 1, None):
        model.transformer.encoder.checkpoint_layers = recomputed
        loss, grads = loss_and_grads(model, 0, ids, ids)
        torch.testing.assert_close(loss, plain)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, msg=name)


def frozen_head_grads(model, chunk, ids, labels):
    """Loss and gradients with the output layer frozen (as LoRA leaves it), and how often it was called on a
    chunk of tokens."""
    head = model.transformer.output_layer
    head.weight.requires_grad_(False)
    calls, handle = count_chunk_calls(head)
    loss, grads = loss_and_grads(model, chunk, ids, labels)
    handle.remove()
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
    full, full_grads, _ = frozen_head_grads(model, 0, ids, labels)
    fused, grads, calls = frozen_head_grads(model, chunk, ids, labels)
    assert calls == 0
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
        loss = lm_loss(model, chunk, ids, ids)
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
    calls, _ = count_chunk_calls(model.transformer.output_layer)
    _, grads = loss_and_grads(model, 5, ids, ids)
    assert grads["transformer.output_layer.weight"] is not None
    assert len(calls) == 2 * 4  # 16 scored tokens in chunks of 5, each recomputed


def test_frozen_head_under_fp16_autocast_recomputes_its_logits():
    """fp16 mixed precision scales the loss before the backward (small gradients would underflow fp16): the
    gradient cannot be computed, in fp16, before that scale is known."""
    model = tiny_model()
    model.transformer.output_layer.weight.requires_grad_(False)
    calls, _ = count_chunk_calls(model.transformer.output_layer)
    ids = torch.randint(0, 211, (2, 9))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = lm_loss(model, 5, ids, ids)
    loss.backward()
    assert len(calls) == 2 * 4 and torch.isfinite(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lm_loss(model, 5, ids, ids).backward()
    assert len(calls) == 2 * 4  # bf16 autocast: the gradient is computed with the loss
