"""The tiny-tokenizer trainer: reproducible, ChatGLM2 layout, lossless on any text."""

import json

import pytest

from glmtune.tokenizers.chatglm2 import ChatGLM2Tokenizer, ChatGLM3Tokenizer
from glmtune.tokenizers.train_spm import train_chatglm2_tokenizer

CORPUS = [
    "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？",
    "北京是中国的首都，有故宫、长城和颐和园。",
    "上海是一座国际化大都市，外滩的夜景很美。",
    "人工智能正在改变我们的生活和工作方式。",
    "请介绍一下你自己。我是一个人工智能助手，很高兴为你服务。",
    "今天天气很好，我们去公园散步吧。",
    "Hello world! ChatGLM is a bilingual model, 2023 年发布。",
    "    def main():\n\tprint('你好')  # 两个空格",
] * 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_chatglm2_tokenizer(CORPUS, tmp_path_factory.mktemp("spm"), vocab_size=600)


def test_layout_and_special_ids(trained):
    assert (
        json.loads((trained / "tokenizer_config.json").read_text())["tokenizer_class"] == "ChatGLMTokenizer"
    )
    v2 = ChatGLM2Tokenizer.from_pretrained(str(trained))
    v3 = ChatGLM3Tokenizer.load(trained)
    n_sp = v2.sp_model.vocab_size()
    assert 300 < n_sp <= 600
    assert [v3.get_command(t) for t in v3.command_tokens] == list(range(n_sp, n_sp + 9))
    assert v2.vocab_size == n_sp + 5 and v3.vocab_size == n_sp + 9
    assert (v2.sp_model.unk_id(), v2.sp_model.bos_id(), v2.sp_model.eos_id()) == (0, 1, 2)
    assert (v3.eos_token_id, v3.pad_token_id) == (2, 0)
    assert v3.encode("明月")[:2] == [n_sp + 1, n_sp + 3]  # [gMASK] sop


def test_deterministic(trained, tmp_path):
    again = train_chatglm2_tokenizer(CORPUS, tmp_path, vocab_size=600)
    assert (again / "tokenizer.model").read_bytes() == (trained / "tokenizer.model").read_bytes()
    assert (again / "tokenizer_config.json").read_bytes() == (trained / "tokenizer_config.json").read_bytes()


def test_deterministic_unigram(tmp_path):
    first = train_chatglm2_tokenizer(CORPUS, tmp_path / "a", vocab_size=500, model_type="unigram")
    second = train_chatglm2_tokenizer(iter(CORPUS), tmp_path / "b", vocab_size=500, model_type="unigram")
    assert (first / "tokenizer.model").read_bytes() == (second / "tokenizer.model").read_bytes()


@pytest.mark.parametrize(
    "text",
    [
        "床前明月光",
        "龘靐齉爩：没见过的字也能还原。",  # characters absent from the corpus: byte fallback
        "表情 😀🐼 和 ümlaut",
        "  两个空格\t制表符\n换行\n\n空行   ",
        "MiXeD Case 123 4.56",
    ],
)
def test_round_trip(trained, text):
    tok = ChatGLM2Tokenizer.from_pretrained(str(trained))
    ids = tok.encode(text)
    assert 0 not in ids  # nothing is unknown
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_chatglm2_tokenizer(CORPUS, tmp_path, vocab_size=100, character_coverage=1.0)


def test_unigram(tmp_path):
    out = train_chatglm2_tokenizer(CORPUS, tmp_path, vocab_size=500, model_type="unigram")
    tok = ChatGLM3Tokenizer.from_pretrained(str(out))
    assert tok.decode(tok.encode("春眠不觉晓 hello"), skip_special_tokens=True) == "春眠不觉晓 hello"
