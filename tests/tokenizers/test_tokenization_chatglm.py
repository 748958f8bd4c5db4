"""ChatGLM-6B (v1) tokenizer against the published tokenizer's outputs (tokenizer_golden.json, golden.pt)."""

import json

import pytest
import torch

from glmtune.tokenizers.chatglm import ChatGLMTokenizer

# The two prompts of golden.pt's padded batch.
BATCH_PROMPTS = ["你好，请介绍一下你自己", "北京"]


@pytest.fixture(scope="module")
def golden(reference_dir):
    return json.loads((reference_dir / "tokenizer_golden.json").read_text(encoding="utf-8"))["v1"]


@pytest.fixture(scope="module")
def tok(reference_dir):  # the real ice_text.model (130k pieces): load once
    return ChatGLMTokenizer.from_pretrained(str(reference_dir / "chatglm-6b-tiny"))


def test_golden_encode(tok, golden):
    for entry in golden["encode"]:
        assert tok.encode(entry["text"]) == entry["ids"], entry["text"]
        assert tok(entry["text"])["input_ids"] == entry["ids"]
        # without special tokens: the same ids minus the trailing [gMASK] <sop>
        assert tok.encode(entry["text"], add_special_tokens=False) == entry["ids"][:-2]


def test_golden_decode(tok, golden):
    for entry in golden["encode"]:
        assert tok.decode(entry["ids"], skip_special_tokens=True) == entry["decoded"]
        assert tok.decode(entry["ids"]) == entry["decoded"] + "[gMASK]<sop>"


def test_special_tokens(tok, golden):
    special = golden["special"]
    assert tok.bos_token_id == special["bos_token_id"] == tok.convert_tokens_to_ids("<sop>")
    assert tok.eos_token_id == special["eos_token_id"] == tok.convert_tokens_to_ids("<eop>")
    assert tok.pad_token_id == special["pad_token_id"]
    assert tok.gmask_token_id == special["[gMASK]"]
    assert tok.mask_token_id == special["[MASK]"]
    assert tok.vocab_size == len(tok) == 130344
    assert tok.padding_side == "left"


def test_whitespace_escapes_round_trip(tok):
    text = "def f(x):\n\treturn x" + " " * 85 + "# 注释\n\n  end"
    tokens = tok.tokenize(text)
    assert "<|blank_80|>" in tokens and "<|blank_5|>" in tokens and "<|tab|>" in tokens and "<n>" in tokens
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_decode_drops_pad_and_out_of_vocab_ids(tok):
    ids = tok.encode("你好")
    assert tok.decode([3, 3] + ids + [130400], skip_special_tokens=True) == "你好"


def test_pair_is_prompt_gmask_sop_answer_eop(tok):
    ids = tok("你好", "我是助手")["input_ids"]
    a, b = tok.encode("你好", add_special_tokens=False), tok.encode("我是助手", add_special_tokens=False)
    assert ids == a + [130001, 130004] + b + [130005]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding(tok, side):
    short, long = tok.encode("北京"), tok.encode("你好，请介绍一下你自己")
    batch = tok(["北京", "你好，请介绍一下你自己"], padding=True, padding_side=side, return_tensors="pt")
    n = len(long) - len(short)
    expected = [3] * n + short if side == "left" else short + [3] * n
    assert batch["input_ids"].tolist() == [expected, long]
    mask = [0] * n + [1] * len(short) if side == "left" else [1] * len(short) + [0] * n
    assert batch["attention_mask"].tolist() == [mask, [1] * len(long)]


def test_published_inputs_match_golden_batch(reference_dir):
    golden = torch.load(reference_dir / "chatglm-6b-tiny" / "golden.pt", weights_only=True)["batch"]
    tok = ChatGLMTokenizer.from_pretrained(str(reference_dir / "chatglm-6b-tiny"), published_inputs=True)
    batch = tok(BATCH_PROMPTS, padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask", "position_ids"}
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert batch[key].dtype == golden[key].dtype, key
        assert torch.equal(batch[key], golden[key]), key
    # right padding mirrors it: pad rows/columns masked, pad positions 0
    right = tok(BATCH_PROMPTS, padding=True, padding_side="right", return_tensors="pt")
    assert right["input_ids"][1].tolist() == golden["input_ids"][1, 5:].tolist() + [3] * 5
    assert torch.equal(right["attention_mask"][1, 0, :3, :3], golden["attention_mask"][1, 0, 5:, 5:])
    assert bool(right["attention_mask"][1, 0, 3:, :].all()) and bool(
        right["attention_mask"][1, 0, :, 3:].all()
    )
    assert right["position_ids"][1].tolist() == [[0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]]


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "ice_text.model").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    for loaded in (ChatGLMTokenizer.from_pretrained(str(tmp_path)), ChatGLMTokenizer.load(tmp_path)):
        text = "保存  再加载\n\tok"
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text), skip_special_tokens=True) == text
        assert (loaded.eos_token_id, loaded.pad_token_id, loaded.gmask_token_id) == (130005, 3, 130001)
        assert loaded.padding_side == "left" and len(loaded) == len(tok)


def test_image_token_offset(reference_dir):
    tok = ChatGLMTokenizer(str(reference_dir / "chatglm-6b-tiny" / "ice_text.model"), num_image_tokens=20000)
    assert tok.vocab_size == 150344
    assert tok.encode("你好") == [20005, 94874, 150001, 150004]
    assert tok.convert_ids_to_tokens(7) == "<image_7>" and tok.convert_tokens_to_ids("<image_7>") == 7
    assert tok.decode(tok.encode("你好"), skip_special_tokens=True) == "你好"
