"""data.template resolution, the one rule training and inference share."""

from __future__ import annotations

import pytest

from glmtune.config import ConfigError
from glmtune.tokenizers.template_choice import FAMILY_TEMPLATES, TEMPLATES, resolve_template_name


@pytest.mark.parametrize("family", sorted(FAMILY_TEMPLATES))
def test_auto_is_the_family_chat_format(family):
    assert resolve_template_name("auto", family) == FAMILY_TEMPLATES[family]
    assert FAMILY_TEMPLATES[family] in TEMPLATES


def test_a_named_template_is_kept_whatever_the_family():
    assert resolve_template_name("chatml", "chatglm2") == "chatml"
    assert resolve_template_name("llama2", "hf") == "llama2"


def test_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.template: choose one .* for a non-ChatGLM model"):
        resolve_template_name("auto", "hf")
    with pytest.raises(ConfigError, match="data.template: unknown template 'vicuna'; choose auto or one of"):
        resolve_template_name("vicuna", "chatglm")
