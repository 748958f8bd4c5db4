"""ChatGLM-6B (v1) against the published implementation's golden outputs, plus size-independent behaviour."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from glmtune.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

ATOL_LOGITS = 1e-4
ATOL_LOSS = 1e-5


# ---- the tiny published checkpoint and its golden outputs ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(reference_dir: Path) -> Path:
    return reference_dir / "chatglm-6b-tiny"


@pytest.fixture(scope="module")
def golden(tiny_dir: Path) -> dict:
    return torch.load(tiny_dir / "golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def state_dict(tiny_dir: Path) -> dict[str, torch.Tensor]:
    """The sharded published pickles, read the way the published loader reads them."""
    shards = sorted(
        set(json.loads((tiny_dir / "pytorch_model.bin.index.json").read_text())["weight_map"].values())
    )
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        sd.update(torch.load(tiny_dir / shard, weights_only=True))
    return sd


def load_tiny(tiny_dir: Path, state_dict: dict, **config_overrides) -> ChatGLMForConditionalGeneration:
    config = ChatGLMConfig.from_pretrained(tiny_dir, **config_overrides)
    model = ChatGLMForConditionalGeneration(config)
    model.load_state_dict(state_dict, strict=True)
    return model.float().eval()


@pytest.fixture(scope="module")
def model(tiny_dir: Path, state_dict: dict) -> ChatGLMForConditionalGeneration:
    return load_tiny(tiny_dir, state_dict)


@pytest.fixture(scope="module")
def real_tokens(golden: dict) -> torch.Tensor:
    """[b, L] bool: positions holding real tokens, not left padding (what golden comparisons look at)."""
    return golden["batch"]["input_ids"] != ChatGLMConfig().pad_token_id


def padding_mask(golden: dict) -> torch.Tensor:
    """The 2D form of the golden batch's mask, as a data collator or transformers would pass it."""
    return (golden["batch"]["input_ids"] != ChatGLMConfig().pad_token_id).long()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_module_tree_matches_published_checkpoint(model, state_dict):
    assert set(model.state_dict()) == set(state_dict)
    for name, tensor in state_dict.items():
        assert model.state_dict()[name].shape == tensor.shape, name


def test_batch_logits_with_published_mask_and_positions(model, golden, real_tokens):
    with torch.no_grad():
        logits = model(**golden["batch"]).logits[..., golden["vocab_index"]]
    assert max_diff(logits[real_tokens], golden["logits"][real_tokens]) < ATOL_LOGITS


def test_batch_logits_with_padding_mask_only(model, golden, real_tokens):
    with torch.no_grad():
        out = model(input_ids=golden["batch"]["input_ids"], attention_mask=padding_mask(golden))
    logits = out.logits[..., golden["vocab_index"]]
    assert max_diff(logits[real_tokens], golden["logits"][real_tokens]) < ATOL_LOGITS


def test_derived_positions_and_mask_match_published_tokenizer(model, golden, real_tokens):
    batch = golden["batch"]
    positions = model.transformer.get_position_ids(batch["input_ids"], padding_mask(golden))
    assert torch.equal(positions, batch["position_ids"])
    L = batch["input_ids"].shape[1]
    mask = model.transformer.get_masks(batch["input_ids"], padding_mask(golden), 0, L, torch.device("cpu"))
    for row in range(L):  # rows of pad tokens differ (published masks them fully); their outputs are unused
        queries = real_tokens[:, row]
        assert torch.equal(mask[queries, :, row], batch["attention_mask"][queries, :, row])


def test_train_loss_and_logits(model, golden):
    train = golden["train"]
    with torch.no_grad():
        out = model(input_ids=train["input_ids"], labels=train["labels"])
    assert abs(out.loss.item() - train["loss"].item()) < ATOL_LOSS
    assert max_diff(out.logits[..., golden["vocab_index"]], train["logits"]) < ATOL_LOGITS


@pytest.mark.parametrize("mask_form", ["published_4d", "padding_2d"])
def test_greedy_generation(model, golden, mask_form):
    batch = golden["batch"]
    if mask_form == "published_4d":
        inputs = dict(batch)
    else:  # tokenizer-style: ids and a padding mask; positions are derived
        inputs = {"input_ids": batch["input_ids"], "attention_mask": padding_mask(golden)}
    out = model.generate(
        **inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    assert torch.equal(out.sequences, golden["generate"]["output_ids"])
    steps = golden["generate"]["step_logits"]
    step_logits = torch.stack([logits[:, golden["vocab_index"]] for logits in out.logits[: len(steps)]])
    assert max_diff(step_logits, steps) < ATOL_LOGITS


@pytest.mark.parametrize("variant", ["plain", "projection"])
def test_ptuning_v2_logits(tiny_dir, state_dict, golden, real_tokens, variant):
    case = golden["ptv2"][variant]
    model = load_tiny(tiny_dir, {**state_dict, **case["prefix_state"]}, **case["config"])
    with torch.no_grad():
        logits = model(**golden["batch"]).logits[..., golden["vocab_index"]]
    assert max_diff(logits[real_tokens], case["logits"][real_tokens]) < ATOL_LOGITS


def test_state_dict_without_inv_freq_loads(tiny_dir, state_dict, golden, real_tokens):
    without = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    model = ChatGLMForConditionalGeneration(ChatGLMConfig.from_pretrained(tiny_dir))
    model.load_state_dict(without, strict=True)  # inv_freq is recomputed, never required
    model.float().eval()
    with torch.no_grad():
        logits = model(**golden["batch"]).logits[..., golden["vocab_index"]]
    assert max_diff(logits[real_tokens], golden["logits"][real_tokens]) < ATOL_LOGITS


def test_config_keeps_published_keys(tiny_dir, tmp_path):
    published = json.loads((tiny_dir / "config.json").read_text())
    config = ChatGLMConfig.from_pretrained(tiny_dir)
    assert config.num_hidden_layers == config.num_layers == 2
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key, value in published.items():
        if key not in ("torch_dtype", "architectures"):
            assert saved[key] == value, key
    for key in ("pre_seq_len", "prefix_projection", "quantization_bit"):
        assert key in saved
    assert ChatGLMConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_default_config_is_released_chatglm_6b():
    config = ChatGLMConfig()
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_attention_heads) == (
        130528,
        4096,
        28,
        32,
    )
    assert (config.bos_token_id, config.eos_token_id, config.gmask_token_id, config.pad_token_id) == (
        130004,
        130005,
        130001,
        3,
    )
    assert config.pre_seq_len is None and config.prefix_projection is False and config.quantization_bit == 0


def test_lm_head_is_tied_as_published(model):
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


# ---- a random model of other sizes: nothing may depend on the shipped shapes or token ids ----------------

MASK, GMASK, BOS, EOS, PAD = 90, 91, 94, 95, 3


def random_config(**overrides) -> ChatGLMConfig:
    sizes = dict(vocab_size=100, hidden_size=96, num_layers=3, num_attention_heads=6, inner_hidden_size=160)
    tokens = dict(
        mask_token_id=MASK, gmask_token_id=GMASK, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD
    )
    # untied head, so that greedy decoding does not just repeat the last token
    return ChatGLMConfig(**sizes, **tokens, tie_word_embeddings=False, **overrides)


def random_model(seed: int = 0, **overrides) -> ChatGLMForConditionalGeneration:
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(random_config(**overrides)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so that the outputs depend on the inputs
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts `... [gMASK] <sop>`, the shorter one left padded: ids [2, 9] and padding mask [2, 9]."""
    long = [11, 12, 13, 14, 15, 16, 17, GMASK, BOS]
    short = [PAD, PAD, PAD, 21, 22, 23, 24, GMASK, BOS]
    mask = torch.tensor([[1] * 9, [0] * 3 + [1] * 6])
    return torch.tensor([long, short]), mask


def test_other_sizes_cache_matches_no_cache():
    model = random_model()
    input_ids, mask = prompts()
    kwargs = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with_cache = model.generate(**kwargs, use_cache=True)
    without_cache = model.generate(**kwargs, use_cache=False)
    assert torch.equal(with_cache, without_cache)
    assert len(set(with_cache[:, 9:].flatten().tolist())) > 1  # not a degenerate repetition


def test_left_padding_does_not_change_generation():
    model = random_model()
    input_ids, mask = prompts()
    batched = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    alone = model.generate(
        input_ids=input_ids[1:, 3:],
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(batched.sequences[1, 3:], alone.sequences[0])
    for step_batched, step_alone in zip(batched.logits, alone.logits):
        assert max_diff(step_batched[1], step_alone[0]) < ATOL_LOGITS


def test_generation_with_4d_mask_matches_padding_mask():
    model = random_model()
    input_ids, mask = prompts()
    L = input_ids.shape[1]
    positions = model.transformer.get_position_ids(input_ids, mask)
    mask_4d = model.transformer.get_masks(input_ids, mask, 0, L, torch.device("cpu"))
    mask_4d = (
        mask_4d | (mask == 0)[:, None, :, None]
    )  # pad rows fully masked, as the published tokenizer does
    kwargs = dict(max_new_tokens=6, do_sample=False)
    from_4d = model.generate(input_ids=input_ids, attention_mask=mask_4d, position_ids=positions, **kwargs)
    from_4d_no_cache = model.generate(
        input_ids=input_ids, attention_mask=mask_4d, position_ids=positions, use_cache=False, **kwargs
    )
    from_2d = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    assert torch.equal(from_4d, from_2d)
    assert torch.equal(from_4d_no_cache, from_2d)


def test_incremental_decoding_matches_full_forward():
    model = random_model()
    input_ids, mask = prompts()
    generated = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    full_mask = torch.cat((mask, torch.ones(2, 4, dtype=mask.dtype)), dim=1)
    with torch.no_grad():
        full = model(input_ids=generated, attention_mask=full_mask).logits
        positions = model.transformer.get_position_ids(generated, full_mask)
        cache = DynamicCache()
        step = model(input_ids=input_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        logits = [step.logits[:, -1]]
        for i in range(9, 12):
            step = model(
                input_ids=generated[:, i : i + 1],
                attention_mask=full_mask[:, : i + 1],
                position_ids=positions[..., i : i + 1],
                past_key_values=step.cache,
                use_cache=True,
            )
            logits.append(step.logits[:, -1])
    # the generated part of the 2D positions: [gMASK] position, block positions 1, 2, 3, ...
    assert positions[0, 0, 8:].tolist() == [7] * 5 and positions[0, 1, 8:].tolist() == [1, 2, 3, 4, 5]
    assert positions[1, 0, 8:].tolist() == [4] * 5
    assert max_diff(torch.stack(logits, 1), full[:, 8:12]) < ATOL_LOGITS


def test_beam_search_and_sampling_run():
    model = random_model()
    input_ids, mask = prompts()
    kwargs = dict(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=5, num_beams=3, num_return_sequences=2
    )
    beams = model.generate(**kwargs, do_sample=False)
    assert beams.shape == (4, 14)
    assert torch.equal(beams, model.generate(**kwargs, do_sample=False, use_cache=False))
    torch.manual_seed(0)
    sampled = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=5
    )
    assert sampled.shape == (2, 14)


@pytest.mark.parametrize("prefix_projection", [False, True])
def test_ptuning_v2_prefix_stays_out_of_the_cache(prefix_projection):
    model = random_model(pre_seq_len=4, prefix_projection=prefix_projection)
    input_ids, mask = prompts()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
    assert out.cache.get_seq_length() == input_ids.shape[1]
    kwargs = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))
    # the prefix changes the output, and trains
    plain = random_model()
    with torch.no_grad():
        assert max_diff(plain(input_ids=input_ids).logits, model(input_ids=input_ids).logits) > 1e-3
    model.train()
    labels = input_ids.masked_fill(mask == 0, -100)
    model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    assert model.transformer.prefix_encoder.embedding.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_loss_and_grads():
    model = random_model().train()
    input_ids, mask = prompts()
    labels = torch.cat((input_ids, torch.tensor([[31, 32, EOS], [33, 34, EOS]])), dim=1)
    input_ids = labels.clone()
    labels[:, :9] = -100
    mask = torch.cat((mask, torch.ones(2, 3, dtype=mask.dtype)), dim=1)

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    assert model.transformer.gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert abs(loss - loss_ckpt) < 1e-6
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert max_diff(grads[name], grads_ckpt[name]) < 1e-6, name


def test_loss_decreases_with_sgd():
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(random_config()).train()
    input_ids = torch.tensor([[11, 12, 13, GMASK, BOS, 41, 42, 43, 44, EOS]])
    labels = input_ids.masked_fill(torch.arange(10) < 4, -100)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_tuple_output_and_hidden_states():
    model = random_model()
    input_ids, _ = prompts()
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True)
        as_tuple = model(input_ids=input_ids, return_dict=False, use_cache=False)
    assert len(out.hidden_states) == model.config.num_layers + 1
    assert torch.equal(as_tuple[0], out.logits)


def test_only_2d_positions_are_implemented():
    with pytest.raises(NotImplementedError):
        ChatGLMForConditionalGeneration(random_config(position_encoding_2d=False))
