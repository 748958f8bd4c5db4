"""Packed batches keep their samples apart: every family's forward, called as training calls it (the collated
packed batch with seq_ids), gives each sample the logits it gets alone."""

from __future__ import annotations

import copy
import inspect
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from glmtune.data.dataset import Collator
from glmtune.data.packing import pack_record
from glmtune.models.families import detect_family
from glmtune.models.loading import load_model, load_tokenizer
from glmtune.models.packing import accept_packed_batches, cu_seqlens
from glmtune.tokenizers.template_choice import FAMILY_TEMPLATES, get_template
from tests.conftest import REFERENCE

CHECKPOINTS = ["chatglm-6b-tiny", "chatglm2-6b-tiny", "chatglm3-6b-tiny"]
DIALOGUES = [
    ("你好", "你好！我是人工智能助手。"),
    ("1+1=?", "2"),
    ("写两句诗", "床前明月光，疑是地上霜。"),
    ("hi", "hello there"),
    ("类型#裤*颜色#黑色", "这款黑色的裤子简约百搭。"),
]
TOL = 1e-5
Sample = tuple[list[int], list[int]]


def as_item(record: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.astype(np.int64)) for k, v in record.items()}


def packed_and_alone(samples: list[Sample], pad_token_id: int) -> tuple[dict, list[dict], list[list[slice]]]:
    """Two packed rows (3 samples, the rest; padded like a training batch), each sample's own batch, and
    where in the packed batch each sample sits: spans[row] = [slice per sample]."""
    rows = [samples[:3], samples[3:]]
    collate = Collator(pad_token_id)
    packed = collate([as_item(pack_record(row)) for row in rows])
    alone = [
        collate([{"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}]) for ids, labels in samples
    ]
    spans = []
    for row in rows:
        start, row_spans = 0, []
        for ids, _ in row:
            row_spans.append(slice(start, start + len(ids)))
            start += len(ids)
        spans.append(row_spans)
    return packed, alone, spans


def assert_samples_kept_apart(model: torch.nn.Module, samples: list[Sample], pad_token_id: int) -> None:
    """The packed batch's logits at each sample's tokens equal that sample's logits alone (fp32), and the packed
    loss is the token-weighted mean of the samples' losses."""
    packed, alone, spans = packed_and_alone(samples, pad_token_id)
    assert packed["seq_ids"].max() >= 2 and (packed["seq_ids"] == 0).any()  # several samples, and padding
    with torch.no_grad():
        out = model(**packed, use_cache=False)  # as the training module calls it
        alone_out = [model(**batch, use_cache=False) for batch in alone]
    k = 0
    total, count = 0.0, 0
    for row, row_spans in enumerate(spans):
        for span in row_spans:
            expected = alone_out[k].logits[0]
            diff = (out.logits[row, span] - expected).abs().max().item()
            assert diff <= TOL, f"sample {k}: packed logits differ from its logits alone by {diff}"
            n = int((alone[k]["labels"][0, 1:] != -100).sum())
            total, count = total + float(alone_out[k].loss) * n, count + n
            k += 1
    assert float(out.loss) == pytest.approx(total / count, abs=1e-5)


@pytest.fixture(scope="module")
def reference() -> Path:
    assert REFERENCE.is_dir(), f"reference checkpoints not found at {REFERENCE}"
    return REFERENCE


def chatglm_samples(folder: Path) -> list[Sample]:
    template = get_template(FAMILY_TEMPLATES[detect_family(folder)], load_tokenizer(folder))
    return [tuple(template.build_train_sample(q, a)) for q, a in DIALOGUES]


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("pre_seq_len", [None, 4])
def test_chatglm_packed_samples_equal_samples_alone(reference: Path, name: str, pre_seq_len: int | None):
    folder = reference / name
    model = load_model(folder, torch_dtype=torch.float32, pre_seq_len=pre_seq_len)
    samples = chatglm_samples(folder)
    if name == "chatglm-6b-tiny":  # every sample has its own [gMASK] and <sop>: 2D positions per sample
        config = model.config
        assert all(ids.count(config.gmask_token_id) == 1 and config.bos_token_id in ids for ids, _ in samples)
    assert_samples_kept_apart(model, samples, pad_token_id=model.config.pad_token_id)


def test_chatglm_6b_positions_are_per_sample(reference: Path):
    """Each packed sample's 2D positions are those of the sample alone: the block position restarts."""
    folder = reference / "chatglm-6b-tiny"
    model = load_model(folder, torch_dtype=torch.float32)
    samples = chatglm_samples(folder)
    packed, alone, spans = packed_and_alone(samples, model.config.pad_token_id)
    positions = model.transformer.get_position_ids(packed["input_ids"], seq_ids=packed["seq_ids"])
    k = 0
    for row, row_spans in enumerate(spans):
        for span in row_spans:
            assert torch.equal(
                positions[row, :, span], model.transformer.get_position_ids(alone[k]["input_ids"])[0]
            )
            k += 1
        assert (positions[row, :, row_spans[-1].stop :] == 0).all()  # padding


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_chatglm_refuses_seq_ids_with_a_cache(reference: Path, name: str):
    model = load_model(reference / name, torch_dtype=torch.float32)
    packed, _, _ = packed_and_alone(chatglm_samples(reference / name), model.config.pad_token_id)
    with pytest.raises(ValueError, match="seq_ids"):
        model(**packed, use_cache=True)
    with pytest.raises(ValueError, match="seq_ids"):
        model.generate(input_ids=packed["input_ids"][:1], seq_ids=packed["seq_ids"][:1], max_new_tokens=2)


# ---- transformers models -----------------------------------------------------------------------------------


def tiny_llama(attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).float().eval()


def random_samples(lengths: tuple[int, ...] = (7, 3, 11, 5, 9)) -> list[Sample]:
    generator = torch.Generator().manual_seed(1)
    samples = []
    for n in lengths:
        ids = torch.randint(1, 128, (n,), generator=generator).tolist()
        samples.append((ids, [-100] * (n // 2) + ids[n // 2 :]))
    return samples


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_llama_packed_samples_equal_samples_alone(attn_implementation: str):
    model = accept_packed_batches(tiny_llama(attn_implementation))
    assert_samples_kept_apart(model, random_samples(), pad_token_id=0)


@pytest.mark.parametrize("architecture", ["GPTNeoX", "Qwen2"])
def test_other_transformers_models_keep_packed_samples_apart(architecture: str):
    import transformers

    torch.manual_seed(0)
    sizes = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    if architecture == "Qwen2":
        sizes["num_key_value_heads"] = 2
    config = getattr(transformers, f"{architecture}Config")(**sizes, pad_token_id=0)
    model = getattr(transformers, f"{architecture}ForCausalLM")(config).float().eval()
    assert_samples_kept_apart(accept_packed_batches(model), random_samples(), pad_token_id=0)


def test_llama_packing_through_lora():
    model = accept_packed_batches(tiny_llama())
    # non-zero LoRA B, so the adapter changes the logits; PEFT passes seq_ids on to the wrapped forward
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    assert_samples_kept_apart(get_peft_model(model, lora).eval(), random_samples(), pad_token_id=0)


def test_load_model_lets_transformers_models_take_packed_batches(tmp_path: Path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    model = load_model(tmp_path / "llama", torch_dtype=torch.float32)
    assert_samples_kept_apart(model, random_samples(), pad_token_id=0)
    # copies (deepcopy, pickle) keep the packed forward, bound to the copy
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.forward.model is clone
        assert_samples_kept_apart(clone, random_samples(), pad_token_id=0)


def test_llama_generation_and_unpacked_calls_unchanged():
    plain, packed = tiny_llama(), accept_packed_batches(tiny_llama())
    # generate() and PEFT read the forward's signature to decide what to pass
    parameters = set(inspect.signature(packed.forward).parameters)
    assert parameters == set(inspect.signature(plain.forward).parameters) | {"seq_ids"}
    left_padded = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = (left_padded != 0).long()
    assert torch.equal(
        plain.generate(left_padded, attention_mask=mask, max_new_tokens=3, do_sample=False),
        packed.generate(left_padded, attention_mask=mask, max_new_tokens=3, do_sample=False),
    )
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, packed(input_ids=ids).logits)
    assert torch.equal(
        plain.generate(ids, max_new_tokens=3, do_sample=False),
        packed.generate(ids, max_new_tokens=3, do_sample=False),
    )
    batch, _, _ = packed_and_alone(random_samples(), pad_token_id=0)
    with pytest.raises(ValueError, match="seq_ids"):
        packed(**batch, use_cache=True)


def test_cu_seqlens_counts_samples_row_by_row():
    seq_ids = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    cu, longest = cu_seqlens(seq_ids)
    assert cu.tolist() == [0, 3, 5, 6, 9, 11] and longest == 3


# ---- FlashAttention's varlen kernel (CUDA) ----------------------------------------------------------------


def sdpa_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=False):
    """flash_attn_varlen_func's contract, written with SDPA: [n, heads, d] tokens, causal within each span."""
    assert causal and dropout_p == 0.0 and torch.equal(cu_q, cu_k)
    spans = zip(cu_q[:-1].tolist(), cu_q[1:].tolist())
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            *(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True, enable_gqa=True
        ).transpose(0, 1)
        for a, b in spans
    ]
    return torch.cat(outs)


def chatglm2_packed_logits(
    folder: Path, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    model = load_model(folder, torch_dtype=dtype, device=device)
    packed, _, _ = packed_and_alone(chatglm_samples(folder), model.config.pad_token_id)
    packed = {k: v.to(device) for k, v in packed.items()}
    with torch.no_grad():
        logits = model(**packed, use_cache=False).logits.float()
    return logits, packed["seq_ids"] != 0


def test_chatglm2_varlen_path_equals_the_mask(reference: Path, monkeypatch: pytest.MonkeyPatch):
    """The spans handed to the varlen kernel select the same attention as the block mask (CPU, bf16, the kernel
    replaced by its contract written with SDPA)."""
    import sys
    import types

    import glmtune.models.chatglm2 as chatglm2

    folder = reference / "chatglm2-6b-tiny"
    with_mask, real = chatglm2_packed_logits(folder, "cpu", torch.bfloat16)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=sdpa_varlen))
    monkeypatch.setattr(chatglm2, "flash_varlen_available", lambda device: True)
    with_spans, _ = chatglm2_packed_logits(folder, "cpu", torch.bfloat16)
    diff = (with_spans - with_mask)[real].abs().max().item()
    assert diff < 0.05 * with_mask[real].abs().max().item(), diff


@pytest.mark.gpu
def test_chatglm2_flash_varlen_on_cuda_equals_the_mask(reference: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("flash_attn")
    import glmtune.models.chatglm2 as chatglm2

    folder = reference / "chatglm2-6b-tiny"
    with_spans, real = chatglm2_packed_logits(folder, "cuda", torch.bfloat16)
    monkeypatch.setattr(chatglm2, "flash_varlen_available", lambda device: False)
    with_mask, _ = chatglm2_packed_logits(folder, "cuda", torch.bfloat16)
    diff = (with_spans - with_mask)[real].abs().max().item()
    assert diff < 0.05 * with_mask[real].abs().max().item(), diff
