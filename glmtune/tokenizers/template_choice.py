"""Which chat template a config means: `data.template` by name, or "auto" for the model family's own.

Training builds its samples and inference builds its prompts with the template this picks, so a model is
asked questions in the format it was tuned on.
"""

from __future__ import annotations

from glmtune.config import ConfigError
from glmtune.tokenizers.prompts import TEMPLATES

# "chatglm3" is ChatGLM3's chat format (role tokens), so training sees the prompts chat() builds.
FAMILY_TEMPLATES = {"chatglm": "chatglm", "chatglm2": "chatglm2", "chatglm3": "chatglm3"}


def resolve_template_name(requested: str, family: str) -> str:
    """The template `data.template: requested` names for a model of `family` ("auto": the family's own)."""
    if requested == "auto":
        if family not in FAMILY_TEMPLATES:
            raise ConfigError("data.template: choose one (llama2, chatml, alpaca) for a non-ChatGLM model")
        return FAMILY_TEMPLATES[family]
    if requested not in TEMPLATES:
        raise ConfigError(
            f"data.template: unknown template {requested!r}; choose auto or one of {', '.join(TEMPLATES)}"
        )
    return requested
