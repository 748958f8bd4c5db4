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
    return out, out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


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
