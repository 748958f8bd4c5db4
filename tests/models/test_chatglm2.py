"""ChatGLM2-6B / ChatGLM3-6B network: golden outputs of the published code, cache, generation, training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glmtune.models.chatglm2 import (
    ChatGLM2Config,
    ChatGLM2ForConditionalGeneration,
    RotaryEmbedding,
    apply_rotary_pos_emb,
)

CHECKPOINTS = ["chatglm2-6b-tiny", "chatglm3-6b-tiny"]
TOL = 1e-4  # max abs logits difference vs the published implementation (README: agrees to ~1e-5)


@dataclass
class Reference:
    folder: Path
    config: dict
    state: dict[str, torch.Tensor]
    golden: dict


@pytest.fixture(scope="module", params=CHECKPOINTS)
def ref(request: pytest.FixtureRequest, reference_dir: Path) -> Reference:
    folder = reference_dir / request.param
    return Reference(
        folder=folder,
        config=json.loads((folder / "config.json").read_text()),
        state=load_file(str(folder / "model.safetensors")),
        golden=torch.load(folder / "golden.pt", weights_only=True),
    )


def build(ref: Reference, **overrides: object) -> ChatGLM2ForConditionalGeneration:
    """The tiny checkpoint in float32, eval mode; `overrides` change the config (e.g. P-Tuning v2)."""
    model = ChatGLM2ForConditionalGeneration(ChatGLM2Config(**{**ref.config, **overrides}))
    state = dict(ref.state)
    if overrides.get("pre_seq_len"):
        kind = "projection" if overrides.get("prefix_projection") else "plain"
        state.update(ref.golden["ptv2"][kind]["prefix_state"])
    model.load_state_dict(state)
    return model.float().eval()


@pytest.fixture(scope="module")
def model(ref: Reference) -> ChatGLM2ForConditionalGeneration:
    return build(ref)


def max_diff_real(logits: torch.Tensor, golden: torch.Tensor, ref: Reference) -> float:
    """Max abs difference at the golden vocab columns and at real (not left-padding) positions."""
    real = ref.golden["batch"]["attention_mask"].bool()
    return (logits[..., ref.golden["vocab_index"]] - golden)[real].abs().max().item()


# ---------------------------------------------------------------- golden outputs of the published code


def test_parameter_names_are_the_published_ones(
    ref: Reference, model: ChatGLM2ForConditionalGeneration
) -> None:
    assert set(model.state_dict()) == set(ref.state)
    ptv2 = build(ref, pre_seq_len=4, prefix_projection=True)
    assert set(ptv2.state_dict()) == set(ref.state) | set(ref.golden["ptv2"]["projection"]["prefix_state"])
    for name in ("query_key_value", "dense"):
        assert (
            type(model.get_submodule(f"transformer.encoder.layers.0.self_attention.{name}"))
            is torch.nn.Linear
        )


def test_logits_match_golden(ref: Reference, model: ChatGLM2ForConditionalGeneration) -> None:
    with torch.no_grad():
        logits = model(**ref.golden["batch"]).logits
    diff = max_diff_real(logits, ref.golden["logits"], ref)
    print(f"{ref.folder.name} batch logits max diff {diff:.3g}")
    assert diff <= TOL


def test_train_loss_and_logits_match_golden(ref: Reference, model: ChatGLM2ForConditionalGeneration) -> None:
    train = ref.golden["train"]
    with torch.no_grad():
        out = model(input_ids=train["input_ids"], labels=train["labels"])
    logits_diff = (out.logits[..., ref.golden["vocab_index"]] - train["logits"]).abs().max().item()
    loss_diff = (out.loss - train["loss"]).abs().item()
    print(f"{ref.folder.name} train loss diff {loss_diff:.3g}, logits max diff {logits_diff:.3g}")
    assert out.loss.dtype == torch.float32
    assert loss_diff <= 1e-5
    assert logits_diff <= TOL


def test_greedy_generate_matches_golden(ref: Reference, model: ChatGLM2ForConditionalGeneration) -> None:
    batch, golden = ref.golden["batch"], ref.golden["generate"]
    out = model.generate(
        **batch,
        max_new_tokens=8,
        do_sample=False,
        use_cache=True,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, golden["output_ids"])
    steps = torch.stack(out.scores[:4])[..., ref.golden["vocab_index"]]
    diff = (steps - golden["step_logits"]).abs().max().item()
    print(f"{ref.folder.name} generate step logits max diff {diff:.3g}")
    assert diff <= TOL


def test_generate_derives_positions_from_the_mask(
    ref: Reference, model: ChatGLM2ForConditionalGeneration
) -> None:
    """Without position_ids, left padding must still give the published tokens (positions from the mask)."""
    batch = ref.golden["batch"]
    out = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=8,
        do_sample=False,
    )
    assert torch.equal(out, ref.golden["generate"]["output_ids"])


def test_left_padded_row_equals_unpadded(ref: Reference, model: ChatGLM2ForConditionalGeneration) -> None:
    batch, expected = ref.golden["batch"], ref.golden["generate"]["output_ids"]
    row = batch["attention_mask"][1].bool()
    alone = model.generate(input_ids=batch["input_ids"][1:, row], max_new_tokens=8, do_sample=False)
    assert torch.equal(alone[0, -8:], expected[1, -8:])


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_ptuning_v2_logits_match_golden(ref: Reference, projection: bool) -> None:
    golden = ref.golden["ptv2"]["projection" if projection else "plain"]
    assert golden["config"] == {"pre_seq_len": 4, "prefix_projection": projection}
    model = build(ref, **golden["config"])
    with torch.no_grad():
        logits = model(**ref.golden["batch"]).logits
    diff = max_diff_real(logits, golden["logits"], ref)
    print(f"{ref.folder.name} ptv2 {'projection' if projection else 'plain'} logits max diff {diff:.3g}")
    assert diff <= TOL


# ---------------------------------------------------------------- cache, generation modes


@pytest.mark.parametrize("pre_seq_len", [None, 4], ids=["base", "ptv2"])
def test_generate_cache_equals_no_cache(ref: Reference, pre_seq_len: int | None) -> None:
    model = build(ref, pre_seq_len=pre_seq_len, prefix_projection=bool(pre_seq_len))
    kwargs = dict(**ref.golden["batch"], max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(**kwargs, use_cache=True), model.generate(**kwargs, use_cache=False))


def test_cached_decoding_logits_equal_full_forward(
    ref: Reference, model: ChatGLM2ForConditionalGeneration
) -> None:
    batch = ref.golden["batch"]
    full_ids = ref.golden["generate"]["output_ids"]
    new = full_ids.shape[1] - batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones(2, new, dtype=torch.long)], dim=1)
    positions = torch.cat(
        [batch["position_ids"], batch["position_ids"][:, -1:] + torch.arange(1, new + 1)], dim=1
    )
    with torch.no_grad():
        full = model(input_ids=full_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        length = batch["input_ids"].shape[1]
        out = model(**batch, use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(length, full_ids.shape[1] - 1):
            out = model(
                input_ids=full_ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                position_ids=positions[:, t : t + 1],
                past_key_values=out.cache,
            )
            steps.append(out.logits[:, -1])
    assert out.cache.get_seq_length() == full_ids.shape[1] - 1
    torch.testing.assert_close(torch.stack(steps, 1), full[:, length - 1 : -1], atol=1e-5, rtol=0)


def test_beam_search_and_sampling_run(ref: Reference, model: ChatGLM2ForConditionalGeneration) -> None:
    batch = ref.golden["batch"]
    beams = model.generate(**batch, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, batch["input_ids"].shape[1] + 5)
    beams_no_cache = model.generate(
        **batch, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, use_cache=False
    )
    assert torch.equal(beams, beams_no_cache)
    torch.manual_seed(0)
    sampled = model.generate(**batch, max_new_tokens=5, do_sample=True, top_p=0.8, temperature=0.9)
    assert sampled.shape == (2, batch["input_ids"].shape[1] + 5)


# ---------------------------------------------------------------- training


def loss_and_grads(
    model: ChatGLM2ForConditionalGeneration, ref: Reference
) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    train = ref.golden["train"]
    loss = model(input_ids=train["input_ids"], labels=train["labels"]).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_matches_plain_backward(ref: Reference, reentrant: bool) -> None:
    model = build(ref).train()
    loss, grads = loss_and_grads(model, ref)
    calls = []
    layers = model.transformer.encoder.layers
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in layers]
    with pytest.warns(FutureWarning):  # transformers 5 renamed it activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.transformer.encoder.gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads(model, ref)
    for hook in hooks:
        hook.remove()
    assert len(calls) == 2 * model.config.num_layers  # every layer ran again in backward
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_ptuning_v2_gradients_reach_the_prefix_under_checkpointing(ref: Reference) -> None:
    """P-Tuning v2 trains only the prefix encoder; reentrant checkpointing must still give it gradients."""
    model = build(ref, pre_seq_len=4, prefix_projection=True).train()
    for name, param in model.named_parameters():
        param.requires_grad = "prefix_encoder" in name
    torch.manual_seed(0)  # the prefix dropout (p=0.1) draws the same mask in both runs
    _, grads = loss_and_grads(model, ref)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    torch.manual_seed(0)
    _, grads_ckpt = loss_and_grads(model, ref)
    assert grads.keys() == grads_ckpt.keys() == set(ref.golden["ptv2"]["projection"]["prefix_state"])
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_lora_wraps_the_block_linears(ref: Reference) -> None:
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    )
    model = peft.get_peft_model(build(ref), lora)
    assert model.base_model.model.transformer.encoder.layers[0].self_attention.query_key_value.lora_A
    train = ref.golden["train"]
    loss = model(input_ids=train["input_ids"], labels=train["labels"]).loss
    assert loss.item() == pytest.approx(train["loss"].item(), abs=1e-5)  # LoRA B starts at zero
    loss.backward()
    assert model.generate(**ref.golden["batch"], max_new_tokens=3, do_sample=False).shape[1] == (
        ref.golden["batch"]["input_ids"].shape[1] + 3
    )


# ---------------------------------------------------------------- loading, config


def test_state_dict_without_inv_freq_loads(ref: Reference) -> None:
    model = ChatGLM2ForConditionalGeneration(ChatGLM2Config(**ref.config))
    model.transformer.rotary_pos_emb.inv_freq.zero_()
    state = {k: v for k, v in ref.state.items() if not k.endswith("inv_freq")}
    model.load_state_dict(state)  # strict
    expected = ref.state["transformer.rotary_pos_emb.inv_freq"].float()
    torch.testing.assert_close(model.transformer.rotary_pos_emb.inv_freq, expected, atol=1e-3, rtol=1e-3)


def test_config_keeps_the_published_keys(ref: Reference, tmp_path: Path) -> None:
    config = ChatGLM2Config(**ref.config)
    assert (config.num_hidden_layers, config.vocab_size) == (config.num_layers, config.padded_vocab_size)
    written = config.to_dict()
    for key, value in ref.config.items():
        if key != "torch_dtype":  # transformers 5 stores it as `dtype`
            assert written[key] == value, key
    assert "vocab_size" not in written and "num_hidden_layers" not in written
    config.save_pretrained(tmp_path)
    assert ChatGLM2Config.from_pretrained(tmp_path).to_dict() == written
    defaults = ChatGLM2Config()
    assert (defaults.num_layers, defaults.kv_channels, defaults.pre_seq_len, defaults.quantization_bit) == (
        28,
        128,
        None,
        0,
    )


def test_rotary_is_half_of_each_head_in_adjacent_pairs() -> None:
    rope = RotaryEmbedding(8)
    cache = rope(torch.tensor([[3]]), torch.float32)  # [1, 1, 4, 2]
    x = torch.randn(1, 1, 1, 16)
    out = apply_rotary_pos_emb(x, cache)
    assert torch.equal(out[..., 8:], x[..., 8:])
    theta = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    angle = 3 * theta
    x0, x1 = x[..., 0:8:2], x[..., 1:8:2]
    torch.testing.assert_close(out[..., 0:8:2], x0 * angle.cos() - x1 * angle.sin())
    torch.testing.assert_close(out[..., 1:8:2], x1 * angle.cos() + x0 * angle.sin())


# ---------------------------------------------------------------- other sizes


RANDOM_CONFIGS = {
    "mqa": dict(multi_query_attention=True, multi_query_group_num=3),
    "mha": dict(multi_query_attention=False),
    "layernorm_bias_postln": dict(
        multi_query_attention=True,
        multi_query_group_num=2,
        rmsnorm=False,
        add_bias_linear=True,
        apply_residual_connection_post_layernorm=True,
        post_layer_norm=False,
    ),
    "ptv2": dict(multi_query_attention=True, multi_query_group_num=3, pre_seq_len=3, prefix_projection=True),
}


def random_model(**overrides: object) -> ChatGLM2ForConditionalGeneration:
    config = ChatGLM2Config(
        num_layers=3,
        hidden_size=96,
        num_attention_heads=6,
        kv_channels=16,
        ffn_hidden_size=160,
        padded_vocab_size=128,
        seq_length=64,
        add_qkv_bias=True,
        eos_token_id=None,  # never stop early: every row generates all its tokens
        **overrides,
    )
    torch.manual_seed(0)
    model = ChatGLM2ForConditionalGeneration(config)
    # Larger weights than the default init, so that greedy choices are not near-ties.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.5 if "embedding" in name else 0.12)
    return model.eval()


@pytest.mark.parametrize("overrides", RANDOM_CONFIGS.values(), ids=RANDOM_CONFIGS.keys())
def test_other_sizes_cache_agrees_with_no_cache(overrides: dict) -> None:
    model = random_model(**overrides)
    input_ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding
    attention_mask[2, :5] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False)
    cached = model.generate(**kwargs, use_cache=True, output_scores=True, return_dict_in_generate=True)
    uncached = model.generate(**kwargs, use_cache=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-4, rtol=1e-4)
    beams = model.generate(**kwargs, num_beams=2)
    assert beams.shape == (3, 17)


@pytest.mark.parametrize("overrides", RANDOM_CONFIGS.values(), ids=RANDOM_CONFIGS.keys())
def test_other_sizes_sgd_lowers_loss(overrides: dict) -> None:
    model = random_model(**overrides).train()
    input_ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(2))
    labels = input_ids.clone()
    labels[:, :4] = -100
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(6):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda(ref: Reference, dtype: torch.dtype) -> None:
    """fp32 on CUDA matches the golden; half precision runs generate and training steps sensibly."""
    model = build(ref).to("cuda", dtype)
    batch = {k: v.cuda() for k, v in ref.golden["batch"].items()}
    with torch.no_grad():
        logits = model(**batch).logits.float().cpu()
    diff = max_diff_real(logits, ref.golden["logits"], ref)
    print(f"{ref.folder.name} cuda {dtype} logits max diff {diff:.3g}")
    assert diff <= (TOL if dtype == torch.float32 else 0.1)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    if dtype == torch.float32:
        assert torch.equal(out.cpu(), ref.golden["generate"]["output_ids"])
    ptv2 = build(ref, pre_seq_len=4, prefix_projection=True).to("cuda", dtype)
    ptv2.transformer.prefix_encoder.float()  # the loader keeps the prefix encoder in fp32
    with torch.no_grad():
        logits = ptv2(**batch).logits.float().cpu()
    assert max_diff_real(logits, ref.golden["ptv2"]["projection"]["logits"], ref) <= (
        TOL if dtype == torch.float32 else 0.1
    )
    assert ptv2.generate(**batch, max_new_tokens=4, do_sample=False).shape == (
        2,
        batch["input_ids"].shape[1] + 4,
    )
    ptv2.train()
    train = {k: v.cuda() for k, v in ref.golden["train"].items() if k in ("input_ids", "labels")}
    loss = ptv2(**train).loss
    loss.backward()
    grad = ptv2.transformer.prefix_encoder.embedding.weight.grad
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
