"""The chat templates by name, and which one a config means: `data.template` by name, or "auto" for the
model family's own.

Training builds its samples and inference builds its prompts with the template this picks, so a model is
asked questions in the format it was tuned on.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from glmtune.config import ConfigError
from glmtune.tokenizers.other_prompts import AlpacaTemplate, ChatMLTemplate, Llama2Template
from glmtune.tokenizers.prompts import (
    ChatGLM2Template,
    ChatGLM3PlainTemplate,
    ChatGLM3Template,
    ChatGLMTemplate,
    ChatTemplate,
    GLM4PerMessageTemplate,
    GLM4Template,
)

TEMPLATES: dict[str, type[ChatTemplate]] = {
    cls.name: cls
    for cls in (
        ChatGLMTemplate,
        ChatGLM2Template,
        ChatGLM3Template,
        ChatGLM3PlainTemplate,
        GLM4Template,
        GLM4PerMessageTemplate,
        Llama2Template,
        ChatMLTemplate,
        AlpacaTemplate,
    )
}


def get_template(name: str, tokenizer: PreTrainedTokenizerBase, **options: Any) -> ChatTemplate:
    """The template `name` (see `TEMPLATES`: "chatglm", "chatglm2", "chatglm3", "chatglm3_plain", "glm4",
    "glm4_per_message", "llama2", "chatml", "alpaca") bound to `tokenizer`.

    `options` go to the template: `system` (a default system prompt) for llama2/chatml. "chatglm3" is the
    ChatGLM3 chat format (role tokens, what `chat()` uses), "chatglm3_plain" the plain format of the reference
    fine-tuning data.
    """
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name](tokenizer, **options)


# "chatglm3" is ChatGLM3's chat format (role tokens), so training sees the prompts chat() builds.
FAMILY_TEMPLATES = {"chatglm": "chatglm", "chatglm2": "chatglm2", "chatglm3": "chatglm3", "glm4": "glm4"}


def resolve_template_name(requested: str, family: str) -> str:
    """The template `data.template: requested` names for a model chatting as `family` ("auto": the family's
    own). `family` is the chat family (glmtune.models.families.chat_family): "glm4" for a transformers-native
    GLM folder with GLM-4's vocabulary (GlmForCausalLM, Glm4ForCausalLM), which loads as "hf"."""
    if requested == "auto":
        if family not in FAMILY_TEMPLATES:
            raise ConfigError("data.template: choose one (llama2, chatml, alpaca) for a non-ChatGLM model")
        return FAMILY_TEMPLATES[family]
    if requested not in TEMPLATES:
        raise ConfigError(
            f"data.template: unknown template {requested!r}; choose auto or one of {', '.join(TEMPLATES)}"
        )
    return requested
