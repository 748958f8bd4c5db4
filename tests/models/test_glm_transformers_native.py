"""Transformers-native GLM checkpoints: `GlmForCausalLM` (model_type "glm", THUDM/glm-4-9b-chat-hf's class and
glmtune's `--merge_format transformers`) and `Glm4ForCausalLM` ("glm4", GLM-4-0414) load through transformers
(family "hf"), chat in GLM-4's format (template glm4 over their tokenizer.json, `[gMASK]<sop>` kept), and get
LoRA on their own linears' names.

The "glm" folder is glm-4-9b-chat-tiny exported by glmtune (same weights, so its answers must be the GLM-4
model's); the "glm4" folder has random Glm4ForCausalLM weights of the same shapes, the same tokenizer.json and
GLM-4-0414's chat_template (system messages first, tools as the template's `tools`, not a message's).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from glmtune.inference.artifacts import load_base
from glmtune.inference.transformers_export import save_transformers
from glmtune.models.families import chat_family, detect_family, model_family
from glmtune.models.loading import load_model, load_tokenizer
from glmtune.tokenizers.glm4 import GLM4Tokenizer
from glmtune.tokenizers.glm4_fast import GLM4TokenizerFast
from glmtune.tokenizers.template_choice import get_template, resolve_template_name
from glmtune.tokenizers.tool_prompts import build_messages_sample
from glmtune.training.methods import GLM_HF_LINEARS, default_ia3_targets, default_target_modules
from tests.conftest import REPO_ROOT
from tests.inference.conftest import task_config
from tests.models.test_glm4 import EOS, FOLDER, run_script

KINDS = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
# GLM-4-0414's chat_template (THUDM/GLM-4-9B-0414's tokenizer_config.json), written out from the published
# one (this machine has no copy of that file to check it against).
GLM4_0414_CHAT_TEMPLATE = (
    "[gMASK]<sop>{%- if tools -%}<|system|>\n# 可用工具\n{% for tool in tools %}"
    '{%- set function = tool.function if tool.get("function") else tool %}\n\n## {{ function.name }}\n\n'
    "{{ function | tojson(indent=4, ensure_ascii=False) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{%- endfor %}{%- endif -%}{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n"
    "{{ msg.content }}{%- endif %}{%- endfor %}{%- for message in messages if message.role != 'system' %}"
    "{%- set role = message['role'] %}{%- set content = message['content'] %}"
    '{%- set meta = message.get("metadata", "") %}{%- if role == \'user\' %}<|user|>\n{{ content }}'
    "{%- elif role == 'assistant' and not meta %}<|assistant|>\n{{ content }}"
    "{%- elif role == 'assistant' and meta %}<|assistant|>{{ meta }} \n{{ content }}"
    "{%- elif role == 'observation' %}<|observation|>\n{{ content }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHATS = [
    ("你好", [], None),
    ("Hello,  world!\n  What's 1 + 1?", [("山间茶舍几点开门？", "早上八点。")], None),
    ("再说一遍", [("第一问", "第一答"), ("second", "answer\nwith lines")], "你是一个助手。"),
]


@pytest.fixture(scope="module")
def folders(reference_dir, tmp_path_factory) -> dict[str, Path]:
    from transformers import Glm4Config, Glm4ForCausalLM

    root = tmp_path_factory.mktemp("glm-native")
    engine = load_base(task_config("--model.path", str(reference_dir / FOLDER)))
    glm = save_transformers(engine.model, engine.tokenizer, engine.template, root / "glm", "glm4")
    glm4 = root / "glm4"
    glm4.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(glm / name, glm4 / name)
    (glm4 / "chat_template.jinja").write_text(GLM4_0414_CHAT_TEMPLATE, encoding="utf-8")
    settings = json.loads((glm / "config.json").read_text())
    for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype"):
        settings.pop(key, None)
    torch.manual_seed(0)
    Glm4ForCausalLM(Glm4Config(**settings, architectures=["Glm4ForCausalLM"])).save_pretrained(glm4)
    return {"glm": glm, "glm4": glm4}


def messages(query: str, history: list, system: str | None) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    for q, a in history:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out + [{"role": "user", "content": query}]


@pytest.mark.parametrize("kind", list(KINDS))
def test_family_template_and_tokenizer_are_picked(folders, kind) -> None:
    folder = folders[kind]
    assert json.loads((folder / "config.json").read_text())["model_type"] == kind
    assert detect_family(folder) == "hf"  # transformers' own class loads it
    assert chat_family(folder, "hf") == "glm4"
    assert resolve_template_name("auto", chat_family(folder, "hf")) == "glm4"
    tokenizer = load_tokenizer(folder)
    assert isinstance(tokenizer, GLM4TokenizerFast) and tokenizer.padding_side == "left"
    prefix = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("<sop>")]
    assert tokenizer.encode("你好")[:2] == prefix  # `[gMASK]<sop>` kept in front
    engine = load_base(task_config("--model.path", str(folder)))
    assert type(engine.model).__name__ == KINDS[kind] and model_family(engine.model) == "hf"
    assert engine.template.name == "glm4" and engine.template.stop_token_ids == EOS


def test_other_folders_do_not_chat_as_glm4(folders, tmp_path) -> None:
    """A GLM class with another vocabulary (a ChatGLM2/3 export) and GLM-4's vocabulary on another class."""
    sentencepiece = tmp_path / "chatglm3-export"
    sentencepiece.mkdir()
    (sentencepiece / "config.json").write_text(json.dumps({"model_type": "glm"}))
    (sentencepiece / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {"64790": {"content": "[gMASK]"}, "64792": {"content": "sop"}}})
    )
    assert chat_family(sentencepiece, "hf") == "hf"
    other = tmp_path / "llama"
    shutil.copytree(folders["glm"], other)
    settings = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**settings, "model_type": "llama"}))
    assert chat_family(other, "hf") == "hf"
    assert chat_family(folders["glm"], "chatglm3") == "chatglm3"  # a configured ChatGLM family stays


@pytest.mark.parametrize("kind", list(KINDS))
def test_chat_prompts_and_samples_are_the_published_ones(folders, reference_dir, kind) -> None:
    """The glm4 template over the folder's tokenizer.json: prompts equal its own chat_template's ids (through
    plain transformers' AutoTokenizer) and the published GLM-4 tokenizer's; training samples (dialogues and
    tool calls) equal those built with the published tokenizer."""
    from transformers import AutoTokenizer

    folder = folders[kind]
    template = get_template("glm4", load_tokenizer(folder))
    plain = AutoTokenizer.from_pretrained(folder)
    published = get_template("glm4", GLM4Tokenizer.from_pretrained(str(reference_dir / FOLDER)))
    for query, history, system in CHATS:
        ids = template.build_chat_prompt(query, history, system).input_ids
        expected = plain.apply_chat_template(
            messages(query, history, system), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert ids == list(expected) == published.build_chat_prompt(query, history, system).input_ids
        turns = [*history, (query, "好的，" + query)]
        assert template.build_dialogue_sample(turns, system) == published.build_dialogue_sample(turns, system)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    dialogue = [
        {"role": "system", "content": "", "tools": tools},
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
        {"role": "observation", "content": '{"weather": "晴"}'},
        {"role": "assistant", "content": "晴天。"},
    ]
    if (
        kind == "glm"
    ):  # GLM-4-9B-Chat's chat_template: tools on the system message, as glmtune's data has them
        expected = build_messages_sample(published.tokenizer, dialogue)
        assert build_messages_sample(template.tokenizer, dialogue) == expected
    else:  # GLM-4-0414's ignores a message's tools: refused, never a prompt without the tools
        with pytest.raises(ValueError, match="does not render the tools of a message"):
            build_messages_sample(template.tokenizer, dialogue)


def test_the_exported_glm4_answers_as_glm4_does(folders, reference_dir) -> None:
    """glm-4-9b-chat-tiny as GlmForCausalLM through glmtune's hf path answers as glmtune's GLM-4 model."""
    flags = ("--generation.max_new_tokens", "8")
    native = load_base(task_config("--model.path", str(folders["glm"]), *flags))
    glm4 = load_base(task_config("--model.path", str(reference_dir / FOLDER), *flags))
    for query, history, _ in CHATS:
        assert native.prompt_ids(query) == glm4.prompt_ids(query)
        answer = glm4.chat(query, history)[0]
        assert answer and native.chat(query, history)[0] == answer


@pytest.mark.parametrize("kind", list(KINDS))
def test_lora_targets_are_the_glm_linears(folders, kind) -> None:
    from glmtune.training.methods import apply_method

    model = load_model(folders[kind], torch_dtype="float32")
    assert default_target_modules(model) == GLM_HF_LINEARS
    assert default_ia3_targets(model) == ["q_proj", "k_proj", "v_proj", "down_proj"]
    cfg = task_config("--model.path", str(folders[kind]), "--lora.target_modules", "null")
    cfg.lora.modules_to_save = None
    wrapped = apply_method(model, cfg)
    adapted = {name.rsplit(".", 1)[-1] for name, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(GLM_HF_LINEARS)
    layers = model.config.num_hidden_layers
    linears = [n for n, m in wrapped.named_modules() if hasattr(m, "lora_A")]
    assert len(linears) == layers * len(GLM_HF_LINEARS)  # every block's six linears, and nothing else
    assert not any("lm_head" in n for n in linears)
    trained = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert not isinstance(wrapped.get_output_embeddings(), nn.Identity)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_native_glm_through_the_scripts(folders, tmp_path, kind) -> None:
    """data_utils.py, train.py (LoRA with the default targets) and infer_lora_finetuning.py --predict."""
    flags = [
        "--model.path", str(folders[kind]), "--model.tiny", "null", "--data.output_dir", str(tmp_path / "records"),
        "--train.output_dir", str(tmp_path / "run"), "--lora.target_modules", "null",
        "--lora.modules_to_save", "null", "--train.max_steps", "3", "--train.batch_size", "2",
    ]  # fmt: skip
    run_script("data_utils.py", *flags)
    run_script("train.py", *flags)
    final = tmp_path / "run" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(GLM_HF_LINEARS)
    assert "template: auto" in (final / "hyperparameters.yaml").read_text()
    answers = run_script("infer_lora_finetuning.py", *flags, "--predict", "data/dev.json", "--limit", "2")
    assert answers.strip().splitlines()[-1].startswith("exact match: ")

    # Merged, it is the same kind of folder: transformers' class, a plain fast tokenizer that keeps the prefix.
    from transformers import AutoTokenizer

    merged = tmp_path / "merged"
    run_script("infer_lora_finetuning.py", *flags, "--merge", str(merged))
    assert json.loads((merged / "config.json").read_text())["architectures"] == [KINDS[kind]]
    assert (
        json.loads((merged / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    plain = AutoTokenizer.from_pretrained(merged)
    assert plain.encode("你好") == load_tokenizer(folders[kind]).encode("你好")
    assert chat_family(merged, detect_family(merged)) == "glm4"


@pytest.mark.parametrize("kind", list(KINDS))
def test_native_glm4_is_glm4_for_fp16_refusal_and_preference_pairs(folders, tmp_path, kind) -> None:
    from glmtune.config import ConfigError
    from glmtune.training.preference_data import prepare_pairs
    from glmtune.training.trainer import check_half_precision

    cfg = task_config("--model.path", str(folders[kind]), "--train.precision", "16-mixed")
    with pytest.raises(ConfigError, match="GLM-4 overflows in fp16"):
        check_half_precision(cfg)
    cfg = task_config(
        "--config", str(REPO_ROOT / "config" / "dpo.yaml"), "--model.path", str(folders[kind]),
        "--data.output_dir", str(tmp_path / "records"),
    )  # fmt: skip
    assert prepare_pairs(cfg).template_name == "glm4"
