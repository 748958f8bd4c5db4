"""Chat prompt templates: the ChatGLM ones against the published chat()/fine-tune outputs, the generic ones
(LLaMA-2, ChatML, Alpaca) on a tiny tokenizer trained here."""

import json

import pytest
import torch

from glmtune.data.samples import IGNORE_INDEX
from glmtune.tokenizers.chatglm import ChatGLMTokenizer
from glmtune.tokenizers.chatglm2 import ChatGLM2Tokenizer, ChatGLM3Tokenizer
from glmtune.tokenizers.prompts import as_pairs
from glmtune.tokenizers.template_choice import TEMPLATES, get_template
from glmtune.tokenizers.train_spm import train_chatglm2_tokenizer

FAMILIES = {
    "v1": ("chatglm", ChatGLMTokenizer, "chatglm-6b-tiny"),
    "v2": ("chatglm2", ChatGLM2Tokenizer, "chatglm2-6b-tiny"),
    "v3": ("chatglm3", ChatGLM3Tokenizer, "chatglm3-6b-tiny"),
}
HISTORY = [("早", "早上好"), ("你是谁", "我是助手")]
CORPUS = [
    "早上好，我是助手。你好，你是谁？今天天气很好。",
    "[INST] <<SYS>> <</SYS>> [/INST] <|im_start|> <|im_end|> system user assistant",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Response: 请回答问题。",
] * 5


@pytest.fixture(scope="module")
def golden(reference_dir):
    return json.loads((reference_dir / "tokenizer_golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def chatglm(reference_dir):
    return {
        fam: (get_template(name, cls.from_pretrained(str(reference_dir / folder))), folder)
        for fam, (name, cls, folder) in FAMILIES.items()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A LLaMA-like tokenizer: our trained SentencePiece model, bos <s>=1, eos </s>=2."""
    folder = train_chatglm2_tokenizer(CORPUS, tmp_path_factory.mktemp("tiny"), vocab_size=400)
    return ChatGLM2Tokenizer.from_pretrained(str(folder), bos_token="<s>")


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("fam", ["v1", "v2", "v3"])
def test_golden_chat_prompt(chatglm, golden, fam):
    template, _ = chatglm[fam]
    for entry in golden[fam]["chat"]:
        prompt = template.build_chat_prompt(entry["query"], entry["history"])
        assert prompt.text == entry["prompt"]
        assert prompt.input_ids == entry["ids"]


@pytest.mark.parametrize("fam", ["v1", "v2", "v3"])
def test_golden_train_sample(chatglm, golden, reference_dir, fam):
    template, folder = chatglm[fam]
    if fam == "v3":  # the reference sample is ChatGLM3's plain format, not its chat format
        template = get_template("chatglm3_plain", template.tokenizer)
    entry = golden[fam]["train_sample"]
    sample = template.build_train_sample(entry["query"], entry["response"])
    assert sample.input_ids == entry["input_ids"]
    assert sample.labels == entry["labels"]
    # the sample the model goldens were computed on is the same
    train = torch.load(reference_dir / folder / "golden.pt", weights_only=True)["train"]
    assert [sample.input_ids] == train["input_ids"].tolist()
    assert [sample.labels] == train["labels"].tolist()


def test_stop_token_ids(chatglm):
    assert chatglm["v1"][0].stop_token_ids == [130005]
    assert chatglm["v2"][0].stop_token_ids == [2]
    assert chatglm["v3"][0].stop_token_ids == [2, 64795, 64797]


def test_chatglm_train_with_history_uses_chat_prompt(chatglm):
    for fam in ("v1", "v2"):
        template, _ = chatglm[fam]
        prompt = template.build_chat_prompt("北京呢", HISTORY).input_ids
        sample = template.build_train_sample("北京呢", "很好", HISTORY)
        start = len(prompt) - 1 if fam == "v1" else len(prompt)  # v1 keeps <sop> in the labels
        assert sample.input_ids[: len(prompt)] == prompt
        assert sample.labels[:start] == [IGNORE_INDEX] * start
        assert sample.labels[start:] == sample.input_ids[start:]
        assert sample.input_ids[-1] == template.tokenizer.eos_token_id


def test_chatglm_truncation(chatglm):
    v1, _ = chatglm["v1"]
    s = v1.build_train_sample("你好" * 20, "很好" * 20, max_source_length=6, max_target_length=7)
    assert s.input_ids.index(130004) == 6 and len(s.input_ids) == 6 + 1 + 5 + 1  # a(5) gmask sop b(5) eop
    v2, _ = chatglm["v2"]
    s = v2.build_train_sample("你好" * 20, "很好" * 20, max_source_length=10, max_target_length=4)
    assert (
        len(s.input_ids) == 10 + 4 + 1
        and s.labels.count(IGNORE_INDEX) == 10
        and s.input_ids[:2] == [64790, 64792]
    )


def test_chatglm3_formats(chatglm):
    v3, _ = chatglm["v3"]
    tok = v3.tokenizer
    plain = get_template("chatglm3_plain", tok).build_train_sample("q", "a", HISTORY)
    turns = [i for q, a in HISTORY for i in enc(tok, q) + enc(tok, a)]
    assert plain.input_ids == [64790, 64792] + turns + enc(tok, "q") + enc(tok, "a") + [2]
    chat = get_template("chatglm3", tok, chat_format=True)
    prompt = chat.build_chat_prompt("q", HISTORY).input_ids
    sample = chat.build_train_sample("q", "a", HISTORY)
    assert prompt[-1] == 64796 and sample.input_ids[: len(prompt)] == prompt
    assert (
        sample.input_ids[len(prompt) :]
        == sample.labels[len(prompt) :]
        == enc(tok, "\n") + enc(tok, "a") + [2]
    )
    assert sample.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    messages = [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "早"}]
    messages.append({"role": "assistant", "content": "早上好"})
    ids = chat.build_chat_prompt("q", messages).input_ids
    assert ids[2] == 64794 and ids.count(64795) == 2


def test_llama2(tiny):
    template = get_template("llama2", tiny, system="你是助手")
    prompt = template.build_chat_prompt("你好", [("早", "早上好")])
    first = "[INST] <<SYS>>\n你是助手\n<</SYS>>\n\n早 [/INST] 早上好 "
    assert prompt.text == f"<s>{first}</s><s>[INST] 你好 [/INST]"
    assert prompt.input_ids == [1] + enc(tiny, first) + [2, 1] + enc(tiny, "[INST] 你好 [/INST]")
    sample = template.build_train_sample("你好", "你好，我是助手。", [("早", "早上好")])
    target = enc(tiny, "你好，我是助手。") + [2]
    assert sample.input_ids == prompt.input_ids + target
    assert sample.labels == [IGNORE_INDEX] * len(prompt.input_ids) + target
    assert template.stop_token_ids == [2]
    bare = get_template("llama2", tiny).build_chat_prompt("你好")
    assert bare.text == "<s>[INST] 你好 [/INST]"


def test_chatml(tiny):
    template = get_template("chatml", tiny, system="你是助手")
    prompt = template.build_chat_prompt(
        "你好", [{"role": "user", "content": "早"}, {"role": "assistant", "content": "早上好"}]
    )
    expected = (
        "<|im_start|>system\n你是助手<|im_end|>\n<|im_start|>user\n早<|im_end|>\n"
        "<|im_start|>assistant\n早上好<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.text == expected and prompt.input_ids == enc(tiny, expected)
    # <|im_end|> is plain text to this tokenizer: eos ends the target as well
    sample = template.build_train_sample("你好", "早上好")
    target = enc(tiny, "早上好<|im_end|>") + [2]
    assert sample.input_ids[-len(target) :] == target and sample.labels[-len(target) :] == target
    assert template.stop_token_ids == [2]


def test_chatml_with_im_tokens(tmp_path):
    folder = train_chatglm2_tokenizer(CORPUS, tmp_path, vocab_size=400)
    tok = ChatGLM2Tokenizer.from_pretrained(str(folder))
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    template = get_template("chatml", tok)
    prompt = template.build_chat_prompt("你好")
    assert prompt.input_ids[0] == im_start and prompt.input_ids.count(im_end) == 1
    sample = template.build_train_sample("你好", "早上好")
    assert sample.input_ids[-1] == im_end and template.stop_token_ids == [im_end, 2]


def test_alpaca(tiny):
    template = get_template("alpaca", tiny)
    prompt = template.build_chat_prompt("你好", [("早", "早上好")])
    header = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
    )
    text = (
        header + "### Instruction:\n早\n\n### Response:\n早上好\n\n### Instruction:\n你好\n\n### Response:\n"
    )
    assert prompt.text == text
    assert prompt.input_ids == tiny.encode(text)  # with the tokenizer's own special tokens
    sample = template.build_train_sample("你好", "早上好", max_target_length=2)
    target = enc(tiny, "早上好")[:2] + [2]
    assert sample.input_ids[-len(target) :] == target
    assert sample.labels.count(IGNORE_INDEX) == len(sample.labels) - len(target)


def test_registry(tiny):
    assert set(TEMPLATES) == {
        "chatglm",
        "chatglm2",
        "chatglm3",
        "chatglm3_plain",
        "glm4",
        "glm4_per_message",
        "llama2",
        "chatml",
        "alpaca",
    }
    for name in TEMPLATES:
        template = get_template(name, tiny)
        assert template.name == name
        assert callable(template.build_chat_prompt) and callable(template.build_train_sample)
        assert isinstance(template.stop_token_ids, list)
    with pytest.raises(ValueError, match="unknown chat template"):
        get_template("vicuna", tiny)


def test_history_forms():
    pairs = [("a", "b"), ("c", "d")]
    messages = [
        {"role": r, "content": c}
        for r, c in [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    ]
    assert as_pairs(pairs) == as_pairs(messages) == pairs
    with pytest.raises(ValueError):
        as_pairs([{"role": "user", "content": "a"}])


def test_system_prompt(chatglm, tiny):
    v1, v2, v3 = (chatglm[f][0] for f in ("v1", "v2", "v3"))
    assert v1.build_chat_prompt("q", system="S").text == "S\nq"
    assert v1.build_chat_prompt("q", [("a", "b")], system="S").text.startswith("[Round 0]\n问：S\na\n答：b\n")
    assert v2.build_chat_prompt("q", system="S").text == "[Round 1]\n\n问：S\nq\n\n答："
    ids = v3.build_chat_prompt("q", [("a", "b")], system="S").input_ids
    assert ids[:3] == [64790, 64792, 64794] and ids.count(64795) == 2
    v3_plain = get_template("chatglm3_plain", v3.tokenizer)
    assert (
        v3_plain.build_train_sample("q", "r", system="S").input_ids
        == v3_plain.build_train_sample("S\nq", "r").input_ids
    )
    llama = get_template("llama2", tiny, system="default")
    assert "<<SYS>>\nS\n<</SYS>>" in llama.build_chat_prompt("q", system="S").text
    assert "<<SYS>>\ndefault\n<</SYS>>" in llama.build_chat_prompt("q").text
    chatml = get_template("chatml", tiny)
    assert chatml.build_chat_prompt("q", system="S").text.startswith("<|im_start|>system\nS<|im_end|>\n")
    alpaca = get_template("alpaca", tiny)
    assert alpaca.build_chat_prompt("q", system="S").text == "S\n\n### Instruction:\nq\n\n### Response:\n"
    sample = alpaca.build_train_sample("q", "r", system="S")
    assert sample.input_ids[: -len(enc(tiny, "r")) - 1] == alpaca.build_chat_prompt("q", system="S").input_ids


def test_protected_prompt_tokens(chatglm, tiny):
    counts = {f: (chatglm[f][0].protected_head, chatglm[f][0].protected_tail) for f in ("v1", "v2", "v3")}
    assert counts == {"v1": (0, 1), "v2": (2, 0), "v3": (2, 1)}
    v3_chat = get_template("chatglm3", chatglm["v3"][0].tokenizer, chat_format=True)
    assert (v3_chat.protected_head, v3_chat.protected_tail) == (2, 1)
    v3_plain = get_template("chatglm3_plain", chatglm["v3"][0].tokenizer)
    assert (v3_plain.protected_head, v3_plain.protected_tail) == (2, 0)
    assert get_template("llama2", tiny).protected_head == 1  # bos
    assert (get_template("alpaca", tiny).protected_head, get_template("alpaca", tiny).protected_tail) == (
        2,
        0,
    )
    v1_alpaca = get_template("alpaca", chatglm["v1"][0].tokenizer)
    assert (v1_alpaca.protected_head, v1_alpaca.protected_tail) == (0, 2)  # ... [gMASK] <sop>
    # a cut prompt keeps its protected tail
    sample = v1_alpaca.build_train_sample("很长的问题" * 10, "好", max_source_length=8)
    assert sample.input_ids[6:8] == [130001, 130004] and sample.labels.count(IGNORE_INDEX) == 8


# --- dialogue samples (one sample per dialogue, every answer supervised) ---------------------------------

DIALOGUE = [("早", "早上好"), ("你是谁", "我是助手。"), ("你好", "你好，我是助手。")]


def supervised_runs(sample) -> list[list[int]]:
    runs, run = [], []
    for i, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == i
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


def check_dialogue_sample(template, turns=DIALOGUE, system=None, runs_per_answer=1):
    """The sample is the train sample of the last turn; the prompt part is the chat prompt; returns the
    supervised runs."""
    sample = template.build_dialogue_sample(turns, system=system)
    *history, (query, response) = turns
    last = template.build_train_sample(query, response, history, system=system)
    prompt = template.build_chat_prompt(query, history, system=system).input_ids
    assert sample.input_ids == last.input_ids and sample.input_ids[: len(prompt)] == prompt
    assert sample.labels[len(prompt) :] == last.labels[len(prompt) :]
    single = template.build_dialogue_sample(turns[:1], system=system)
    assert single == template.build_train_sample(*turns[0], system=system)
    runs = supervised_runs(sample)
    assert len(runs) == runs_per_answer * (len(turns) - 1) + 1
    return runs


@pytest.mark.parametrize("fam", ["v2", "v3"])
def test_chatglm_dialogue_samples(chatglm, fam):
    template, _ = chatglm[fam]
    tok = template.tokenizer
    runs = check_dialogue_sample(template)
    check_dialogue_sample(template, system="简短回答")
    for (_, answer), run in zip(DIALOGUE, runs):
        if fam == "v2":  # the answer's text; "\n\n" after an earlier answer is template text
            text = run[:-1] if run is runs[-1] else run
            assert tok.decode(text).strip() == answer and (run[-1] == 2) == (run is runs[-1])
        else:  # metadata line + answer + the role token (or eos) that ends it
            end = 2 if run is runs[-1] else tok.convert_tokens_to_ids("<|user|>")
            assert run == enc(tok, "\n") + enc(tok, answer) + [end]


def test_chatglm3_plain_template(chatglm):
    tok = chatglm["v3"][0].tokenizer
    plain = get_template("chatglm3_plain", tok)
    prompt = plain.build_chat_prompt("q", HISTORY)
    assert prompt.text is None
    assert prompt.input_ids == [64790, 64792] + [
        i for q, a in HISTORY for i in enc(tok, q) + enc(tok, a)
    ] + enc(tok, "q")
    assert plain.build_train_sample("q", "a", HISTORY).input_ids == prompt.input_ids + enc(tok, "a") + [2]
    runs = check_dialogue_sample(plain)
    assert runs == [enc(tok, a) for _, a in DIALOGUE[:-1]] + [enc(tok, DIALOGUE[-1][1]) + [2]]
    with pytest.raises(ValueError, match="chatglm3_plain"):
        get_template("chatglm3", tok, chat_format=False)
    with pytest.raises(ValueError, match="'chatglm3'"):
        get_template("chatglm3_plain", tok, chat_format=True)


def test_chatglm_6b_refuses_dialogue_samples(chatglm):
    v1, _ = chatglm["v1"]
    with pytest.raises(ValueError, match="bidirectionally.*per_turn"):
        v1.build_dialogue_sample(DIALOGUE)
    alpaca = get_template("alpaca", v1.tokenizer)  # same model, another template: same reason
    assert alpaca.dialogue_unsupported and "bidirectionally" in alpaca.dialogue_unsupported
    with pytest.raises(ValueError, match="bidirectionally"):
        alpaca.build_dialogue_sample(DIALOGUE)


def test_llama2_dialogue_sample(tiny):
    template = get_template("llama2", tiny, system="你是助手")
    # an earlier answer and its </s> are two runs: the space Meta's format writes between them is not
    # supervised (the last answer, as build_train_sample makes it, has none)
    runs = check_dialogue_sample(template, runs_per_answer=2)
    answers = runs[0:-1:2] + [runs[-1][:-1]]
    assert runs[1:-1:2] == [[2]] * (len(DIALOGUE) - 1) and runs[-1][-1] == 2
    assert [tiny.decode(run).strip() for run in answers] == [a for _, a in DIALOGUE]


def test_chatml_dialogue_sample(tiny, tmp_path):
    runs = check_dialogue_sample(get_template("chatml", tiny))
    for (_, answer), run in zip(DIALOGUE, runs):
        assert tiny.decode(run).replace(" ", "").startswith(f"{answer}<|im_end|>")
    folder = train_chatglm2_tokenizer(CORPUS, tmp_path, vocab_size=400)
    tok = ChatGLM2Tokenizer.from_pretrained(str(folder))
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    runs = check_dialogue_sample(get_template("chatml", tok), system="S")
    assert [run[-1] for run in runs] == [im_end] * len(DIALOGUE)


def test_alpaca_dialogue_sample(tiny):
    runs = check_dialogue_sample(get_template("alpaca", tiny))
    for (_, answer), run in zip(DIALOGUE, runs):
        assert tiny.decode(run).replace(" ", "").removesuffix("</s>") == answer


class MergingTokenizer:
    """Characters, except that "ab" is one token: a merge across an answer's boundary."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(1)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids

    def build_inputs_with_special_tokens(self, ids):
        return list(ids)


def test_labelled_text_supervises_tokens_that_cross_an_answer_boundary():
    from glmtune.tokenizers.prompts import ChatTemplate

    template = ChatTemplate(MergingTokenizer())
    sample = template.labelled_text(
        [("xa", False), ("bcd", True), ("a", False), ("b", True), ("z", False)], False
    )
    assert sample.input_ids == [ord("x"), 1, ord("c"), ord("d"), 1, ord("z")]
    # "ab" carries the first answer's first letter, and the second answer's only one
    assert sample.labels == [IGNORE_INDEX, 1, ord("c"), ord("d"), 1, IGNORE_INDEX]
    sample = template.labelled_text([("x", False), ("ya", True), ("bz", False)], False)
    assert sample.input_ids == [ord("x"), ord("y"), 1, ord("z")]
    assert sample.labels == [IGNORE_INDEX, ord("y"), 1, IGNORE_INDEX]  # "ab" carries the answer's last letter


@pytest.mark.parametrize("fam", ["v2", "v3"])
def test_fast_sentencepiece_ids_equal_the_tokenizers(chatglm, golden, fam):
    template, _ = chatglm[fam]
    tok = template.tokenizer
    texts = [e["text"] for e in golden[fam]["encode"]] + ["sop eop [gMASK] <|user|> </s> <unk>\n\t  x"]
    for text in texts:
        assert template.encode(text) == tok.encode(text, add_special_tokens=False)
        assert template.encode_with_special_tokens(text) == tok.encode(text)


def test_fast_sentencepiece_ids_follow_tokenizer_changes(reference_dir):
    tok = ChatGLM3Tokenizer.from_pretrained(str(reference_dir / "chatglm3-6b-tiny"))
    template = get_template("chatglm3", tok)
    text = "你好<|user|>世界 <new>"
    assert template.encode(text) == tok.encode(text, add_special_tokens=False)
    tok.encode_special_tokens = True  # role tokens in the text become the tokens
    assert tok.convert_tokens_to_ids("<|user|>") in template.encode(text)
    tok.encode_special_tokens = False
    tok.add_tokens(["<new>"], special_tokens=True)
    assert tok.convert_tokens_to_ids("<new>") in template.encode(text)
    assert template.encode(text) == tok.encode(text, add_special_tokens=False)
