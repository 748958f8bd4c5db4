"""ChatGLM2 / ChatGLM3 tokenizers against the published tokenizers' outputs (tokenizer_golden.json, golden.pt)."""

import json
import pickle

import pytest
import torch

from glmtune.tokenizers.chatglm2 import ChatGLM2Tokenizer, ChatGLM3Tokenizer

FAMILIES = {"v2": (ChatGLM2Tokenizer, "chatglm2-6b-tiny"), "v3": (ChatGLM3Tokenizer, "chatglm3-6b-tiny")}


@pytest.fixture(scope="module")
def golden(reference_dir):
    return json.loads((reference_dir / "tokenizer_golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizers(reference_dir):
    return {fam: cls.from_pretrained(str(reference_dir / folder)) for fam, (cls, folder) in FAMILIES.items()}


@pytest.mark.parametrize("fam", ["v2", "v3"])
def test_golden_encode(tokenizers, golden, fam):
    tok = tokenizers[fam]
    for entry in golden[fam]["encode"]:
        assert tok.encode(entry["text"]) == entry["ids"], entry["text"]
        assert tok(entry["text"])["input_ids"] == entry["ids"]
        assert tok.encode(entry["text"], add_special_tokens=False) == entry["ids"][2:]


@pytest.mark.parametrize("fam", ["v2", "v3"])
def test_decode(tokenizers, golden, fam):
    tok = tokenizers[fam]
    for entry in golden[fam]["encode"]:
        assert tok.decode(entry["ids"], skip_special_tokens=True) == entry["text"]
        assert tok.decode(entry["ids"]) == "[gMASK]sop" + entry["text"]
    assert tok.decode([64790, 64792, 36474, 54591, 2, 64900], skip_special_tokens=True) == "你好"


@pytest.mark.parametrize("fam", ["v2", "v3"])
def test_special_tokens(tokenizers, golden, fam):
    tok, special = tokenizers[fam], golden[fam]["special"]
    assert tok.bos_token_id is special["bos_token_id"] is None
    assert tok.eos_token_id == special["eos_token_id"] == tok.get_command("<eos>")
    assert tok.pad_token_id == special["pad_token_id"] == tok.get_command("<pad>")
    for name in ("[gMASK]", "sop", "[MASK]"):
        assert tok.get_command(name) == special[name] == tok.convert_tokens_to_ids(name)
    assert tok.vocab_size == len(tok) == (64794 if fam == "v2" else 64798)
    assert tok.padding_side == "left"


def test_v3_role_tokens(tokenizers):
    tok = tokenizers["v3"]
    roles = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert [tok.get_command(r) for r in roles] == [64794, 64795, 64796, 64797]
    with pytest.raises(KeyError):
        tokenizers["v2"].get_command("<|user|>")


def test_v3_chat_input(tokenizers, golden):
    tok = tokenizers["v3"]
    for entry in golden["v3"]["chat"]:
        batch = tok.build_chat_input(entry["query"], entry["history"])
        assert batch["input_ids"].tolist() == [entry["ids"]]
        assert batch["attention_mask"].tolist() == [[1] * len(entry["ids"])]
        # the same history as published ChatGLM3 messages
        messages = [
            {"role": role, "content": text}
            for q, a in entry["history"]
            for role, text in (("user", q), ("assistant", a))
        ]
        assert tok.build_chat_ids(entry["query"], messages) == entry["ids"]
    system = tok.build_chat_ids("hi", [{"role": "system", "content": "be brief", "tools": [{"name": "f"}]}])
    assert system[:3] == [64790, 64792, 64794] and system.count(64795) == 1 and system[-1] == 64796


def test_v2_build_prompt(tokenizers, golden):
    tok = tokenizers["v2"]
    for entry in golden["v2"]["chat"]:
        prompt = tok.build_prompt(entry["query"], entry["history"])
        assert prompt == entry["prompt"]
        assert tok(prompt)["input_ids"] == entry["ids"]


def test_encode_special_tokens_switch(reference_dir):
    text = "<|user|>\n你好[gMASK]"
    default = ChatGLM3Tokenizer.from_pretrained(str(reference_dir / "chatglm3-6b-tiny"))
    assert 64795 not in default.encode(text) and default.encode_special_tokens is False
    tok = ChatGLM3Tokenizer.from_pretrained(
        str(reference_dir / "chatglm3-6b-tiny"), encode_special_tokens=True
    )
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == 64795 and ids[-1] == 64790 and tok.encode_special_tokens is True


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding(tokenizers, side):
    tok = tokenizers["v2"]
    short, long = tok.encode("北京"), tok.encode("你好，请介绍一下你自己")
    batch = tok(["北京", "你好，请介绍一下你自己"], padding=True, padding_side=side, return_tensors="pt")
    n = len(long) - len(short)
    assert batch["input_ids"].tolist()[0] == ([0] * n + short if side == "left" else short + [0] * n)
    assert batch["attention_mask"].tolist()[0] == (
        [0] * n + [1] * len(short) if side == "left" else [1] * len(short) + [0] * n
    )
    assert set(batch) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("fam", ["v2", "v3"])
def test_published_inputs_match_golden_batch(reference_dir, fam):
    cls, folder = FAMILIES[fam]
    golden = torch.load(reference_dir / folder / "golden.pt", weights_only=True)["batch"]
    tok = cls.from_pretrained(str(reference_dir / folder), published_inputs=True)
    if fam == "v2":
        prompts = [tok.build_prompt("你好，请介绍一下你自己"), tok.build_prompt("北京")]
        batch = tok(prompts, padding=True, return_tensors="pt")
    else:
        rows = [{"input_ids": tok.build_chat_ids(q)} for q in ("你好，请介绍一下你自己", "北京")]
        batch = tok.pad(rows, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(batch[key], golden[key]), key
    right = tok.pad([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}], padding_side="right", return_tensors="pt")
    assert right["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("fam", ["v2", "v3"])
def test_save_load_round_trip(tokenizers, tmp_path, fam):
    tok = tokenizers[fam]
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    cls = type(tok)
    for loaded in (cls.from_pretrained(str(tmp_path)), cls.load(tmp_path)):
        text = "保存  再加载\n\tok <|user|>"
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text), skip_special_tokens=True) == text
        assert (loaded.eos_token_id, loaded.pad_token_id, loaded.vocab_size) == (2, 0, tok.vocab_size)
        assert loaded.padding_side == "left" and loaded.encode_special_tokens is False
    if fam == "v3":  # the saved config names the role tokens (family detection looks for them)
        assert "<|user|>" in (tmp_path / "tokenizer_config.json").read_text(encoding="utf-8")


def test_pickle(tokenizers):
    tok = tokenizers["v3"]
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode("你好  x\n") == tok.encode("你好  x\n") and copy.vocab_size == tok.vocab_size
