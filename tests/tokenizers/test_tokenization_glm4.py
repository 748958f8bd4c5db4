"""GLM-4-9B-Chat tokenizer and its chat templates ("glm4", "glm4_per_message") against the published
tokenizer's outputs (glm-4-9b-chat-tiny/tokenizer_golden.json, golden.pt) and the published chat_template."""

import hashlib
import json
import socket

import pytest
import torch

from glmtune.data.samples import IGNORE_INDEX
from glmtune.tokenizers.glm4 import SPECIAL_TOKENS, GLM4Tokenizer, read_ranks
from glmtune.tokenizers.template_choice import get_template

FOLDER = "glm-4-9b-chat-tiny"
MESSAGES = [  # what the published template renders: system, metadata, observation, empty and odd contents
    {"role": "system", "content": "你是助手。"},
    {"role": "user", "content": "  leading spaces\n\n"},
    {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
    {"role": "observation", "content": "\n晴 25°C"},
    {"role": "assistant", "content": ""},
    {"role": "user", "content": "literal <|assistant|> and [gMASK] in text"},
]
CONVERSATION = [
    ("你好", "你好！我是助手。"),
    ("北京有什么好玩的？", "\n\n故宫、长城。"),
    ("那上海呢？", "外滩。"),
]


@pytest.fixture(scope="module")
def folder(reference_dir):
    return reference_dir / FOLDER


@pytest.fixture(scope="module")
def golden(folder):
    return json.loads((folder / "tokenizer_golden.json").read_text(encoding="utf-8"))["v4"]


@pytest.fixture(scope="module")
def tok(folder):
    return GLM4Tokenizer.from_pretrained(str(folder))


def published_sample(tok, pairs, combine):
    """The published GLM-4 finetune_demo `process_batch` for one conversation of (query, answer) pairs."""
    conv = [{"role": r, "content": c} for q, a in pairs for r, c in (("user", q), ("assistant", a))]
    if combine:
        input_ids = tok.apply_chat_template(conv, tokenize=True, return_dict=False)
        last_assistant = len(input_ids) - input_ids[::-1].index(151337) - 1
        loss_masks = [j > last_assistant for j in range(len(input_ids))]
    else:
        input_ids, loss_masks = [151331, 151333], [False, False]
        for message in conv:
            ids = tok.apply_chat_template([message], tokenize=True, return_dict=False)[2:]
            input_ids += ids
            loss_masks += [message["role"] == "assistant"] * len(ids)
    input_ids.append(151336)
    loss_masks = [False, *loss_masks]
    return input_ids, [i if m else IGNORE_INDEX for i, m in zip(input_ids, loss_masks)]


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_file_is_the_published_one(folder, golden):
    data = (folder / "tokenizer.model").read_bytes()
    assert hashlib.sha256(data).hexdigest() == golden["tokenizer_model"]["sha256"]
    assert len(read_ranks(folder / "tokenizer.model")) == golden["tokenizer_model"]["ranks"]


def test_golden_encode(tok, golden):
    for entry in golden["encode"]:
        assert tok.encode(entry["text"]) == entry["ids"], entry["text"]
        assert tok(entry["text"])["input_ids"] == entry["ids"]
        assert tok.encode(entry["text"], add_special_tokens=False) == entry["ids"][2:]


def test_decode(tok, golden):
    for entry in golden["encode"]:
        assert tok.decode(entry["ids"]) == "[gMASK]<sop>" + entry["text"]
        assert tok.decode(entry["ids"], skip_special_tokens=True) == entry["text"].replace("<|user|>", "")
    # an emoji split over two tokens decodes whole; the model's padded rows past the vocabulary are dropped
    assert tok.decode([74764, 222, 151400]) == "😀"
    assert tok.convert_tokens_to_string(tok.tokenize("ümlauts 你好")) == "ümlauts 你好"


def test_special_tokens(tok, golden):
    special = golden["special"]
    assert tok.bos_token_id is special["bos_token_id"] is None
    assert tok.eos_token_id == special["eos_token_id"] == tok.pad_token_id == special["pad_token_id"]
    for token in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(token) == tok.get_command(token) == special[token], token
    assert sorted(special[t] for t in SPECIAL_TOKENS) == list(range(151329, 151343))
    assert set(tok.all_special_ids) >= {special[t] for t in SPECIAL_TOKENS}
    assert tok.vocab_size == len(tok) == 151343
    with pytest.raises(KeyError):
        tok.get_command("sop")  # ChatGLM2/3's name; GLM-4's is <sop>
    assert tok.unk_token_id is None and tok.convert_tokens_to_ids("<|im_end|>") is None


def test_left_padding(tok):
    batch = tok(["你好", "Hello world!"], padding=True, return_tensors="pt")
    assert tok.padding_side == "left"
    assert batch["input_ids"].tolist() == [
        [151329, 151329, 151331, 151333, 109377],
        [151331, 151333, 9703, 1879, 0],
    ]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_save_and_load(tok, golden, folder, tmp_path):
    tok.save_pretrained(tmp_path)
    again = GLM4Tokenizer.from_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    assert again.chat_template == tok.chat_template is not None
    for entry in golden["encode"]:
        assert again.encode(entry["text"]) == entry["ids"]
    # from the vocabulary file alone: the same ids and special tokens
    bare = GLM4Tokenizer(vocab_file=str(folder / "tokenizer.model"))
    assert [bare.encode(e["text"]) for e in golden["encode"]] == [e["ids"] for e in golden["encode"]]
    assert bare.padding_side == "left" and bare.eos_token_id == 151329


def test_loads_offline(folder, monkeypatch):
    """tiktoken is handed the ranks: nothing is fetched (tiktoken's own loaders download named encodings)."""

    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr("tiktoken.load.read_file", no_network)
    assert GLM4Tokenizer.from_pretrained(str(folder)).encode("你好") == [151331, 151333, 109377]


def test_bad_vocabulary_file_is_named(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nnot base64!\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer.model, line 2"):
        GLM4Tokenizer(vocab_file=str(bad))


def test_golden_chat_through_apply_chat_template(tok, golden):
    for entry in golden["chat"]:
        messages = [
            {"role": role, "content": text}
            for q, a in entry["history"]
            for role, text in (("user", q), ("assistant", a))
        ] + [{"role": "user", "content": entry["query"]}]
        assert (
            tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == entry["prompt"]
        )
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert ids == entry["ids"]
        assert tok.chat_text(messages) == entry["prompt"]
        assert tok.build_chat_ids(entry["query"], entry["history"]) == entry["ids"]


def test_chat_ids_equal_the_published_template(tok):
    """The native chat format equals the published Jinja chat_template on what that template renders."""
    for end in range(1, len(MESSAGES) + 1):
        messages = MESSAGES[:end]
        for prompt in (True, False):
            published = tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert tok.chat_text(messages, add_generation_prompt=prompt) == published
        ids = tok.build_chat_ids("next?", messages)
        published = messages + [{"role": "user", "content": "next?"}]
        assert ids == tok.apply_chat_template(published, add_generation_prompt=True, return_dict=False)
    ids = tok.build_chat_ids("\n晴 25°C", MESSAGES[:3], role="observation")
    assert ids == tok.apply_chat_template(MESSAGES[:4], add_generation_prompt=True, return_dict=False)
    with pytest.raises(ValueError, match="apply_chat_template"):
        tok.build_chat_ids("hi", [{"role": "system", "content": "", "tools": [{"type": "python"}]}])
    with pytest.raises(ValueError, match="role"):
        tok.build_chat_ids("hi", role="tool")


# ---------------------------------------------------------------- templates "glm4" and "glm4_per_message"


@pytest.mark.parametrize("name", ["glm4", "glm4_per_message"])
def test_template_chat_prompt(tok, golden, name):
    template = get_template(name, tok)
    for entry in golden["chat"]:
        assert template.build_chat_prompt(entry["query"], entry["history"]).input_ids == entry["ids"]
    system = template.build_chat_prompt("hi", system="be brief").input_ids
    assert system == tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        add_generation_prompt=True,
        return_dict=False,
    )
    assert template.stop_token_ids == [151329, 151336, 151338]  # the published config's eos list


@pytest.mark.parametrize(
    ("name", "key"), [("glm4", "train_sample"), ("glm4_per_message", "train_sample_per_message")]
)
def test_template_golden_train_sample(tok, golden, folder, name, key):
    entry = golden[key]
    sample = get_template(name, tok).build_train_sample(entry["query"], entry["response"])
    assert sample.input_ids == entry["input_ids"]
    assert sample.labels == entry["labels"]
    if entry["combine"]:  # the model goldens were computed on the demo's default labelling
        train = torch.load(folder / "golden.pt", weights_only=True)["train"]
        assert [sample.input_ids] == train["input_ids"].tolist()
        assert [sample.labels] == train["labels"].tolist()


@pytest.mark.parametrize("combine", [True, False])
def test_train_sample_with_history_is_the_demos(tok, combine):
    """combine: true supervises the last answer only: a (query, answer) sample with the earlier turns as
    history is the demo's sample of the whole conversation; an answer starting with newlines included."""
    template = get_template("glm4" if combine else "glm4_per_message", tok)
    for end in (2, 3):
        *history, (query, answer) = CONVERSATION[:end]
        sample = template.build_train_sample(query, answer, history)
        ids, labels = published_sample(tok, CONVERSATION[:end], combine=True)
        assert sample.input_ids == ids
        if combine:
            assert sample.labels == labels
        else:  # the newline after <|assistant|> is supervised too
            first = len(template.build_chat_prompt(query, history).input_ids)
            assert sample.labels[first] == ids[first] and sample.labels[first + 1 :] == labels[first + 1 :]


def test_per_message_dialogue_sample_is_the_demos(tok):
    """combine: false supervises every answer: a dialogue sample is the demo's sample of the conversation."""
    sample = get_template("glm4_per_message", tok).build_dialogue_sample(CONVERSATION)
    assert tuple(sample) == published_sample(tok, CONVERSATION, combine=False)


def test_combined_dialogue_sample_labels_each_answer_as_the_last(tok):
    sample = get_template("glm4", tok).build_dialogue_sample(CONVERSATION)
    per_message = get_template("glm4_per_message", tok).build_dialogue_sample(CONVERSATION)
    assert sample.input_ids == per_message.input_ids
    assistant = [i + 1 for i, t in enumerate(sample.input_ids) if t == 151337]
    assert len(assistant) == 3
    for i, (label, other) in enumerate(zip(sample.labels, per_message.labels)):
        assert label == (IGNORE_INDEX if i in assistant else other)


def test_train_sample_truncation_keeps_the_turn_structure(tok):
    template = get_template("glm4", tok)
    full = template.build_train_sample("你好" * 20, "我是一个AI助手。")
    short = template.build_train_sample(
        "你好" * 20, "我是一个AI助手。", max_source_length=6, max_target_length=3
    )
    prompt = full.input_ids[: full.input_ids.index(151337) + 1]
    assert short.input_ids[:6] == prompt[:5] + [151337]
    assert short.input_ids[6:] == full.input_ids[len(prompt) : len(prompt) + 3] + [151336]
    assert short.labels == [IGNORE_INDEX] * 7 + short.input_ids[7:]
