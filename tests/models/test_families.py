"""model_family and resolve_family: the family of a loaded model, and of a configured folder (detect_family on
the published folders is tested with the loader, tests/models/test_loading.py)."""

import pytest
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from glmtune.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration
from glmtune.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmtune.models.families import model_family, resolve_family


def tiny_chatglm2() -> ChatGLM2ForConditionalGeneration:
    config = ChatGLM2Config(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        kv_channels=8,
        ffn_hidden_size=32,
        padded_vocab_size=64,
    )
    return ChatGLM2ForConditionalGeneration(config)


def test_a_model_built_directly_has_its_config_schemas_family():
    v1 = ChatGLMForConditionalGeneration(
        ChatGLMConfig(
            num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=64, inner_hidden_size=32
        )
    )
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    assert (model_family(v1), model_family(tiny_chatglm2()), model_family(llama)) == (
        "chatglm",
        "chatglm2",
        "hf",
    )


def test_the_declared_family_wins_and_survives_a_peft_wrapper():
    model = tiny_chatglm2()
    model.config.glmtune_family = "chatglm3"  # as load_model declares it: ChatGLM3 shares ChatGLM2's schema
    assert model_family(model) == "chatglm3"
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["query_key_value"]))
    assert model_family(wrapped) == "chatglm3"
    model.glmtune_family = "hf"  # load_model(family="hf"): transformers' own code for a ChatGLM folder
    assert model_family(model) == "hf"


def test_resolve_family_keeps_a_configured_family_and_refuses_an_unknown_one(tmp_path):
    assert resolve_family(tmp_path, "chatglm3") == "chatglm3"  # no folder read
    with pytest.raises(ValueError, match="'chatglm4'"):
        resolve_family(tmp_path, "chatglm4")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_family(tmp_path, "auto")
