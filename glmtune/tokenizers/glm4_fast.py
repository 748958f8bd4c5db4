"""GLM-4's vocabulary as transformers-native folders ship it: a `tokenizer.json` fast tokenizer
(THUDM/glm-4-9b-chat-hf and GLM-4-0414, which transformers opens as `GlmForCausalLM` / `Glm4ForCausalLM`, and
glmtune's own `--merge_format transformers` folders).

`GLM4TokenizerFast` is that tokenizer with what glmtune's GLM-4 templates and tool-call samples ask of a
tokenizer, as `GLM4Tokenizer` has it: `get_command`, the `[gMASK] <sop>` prefix of
`build_inputs_with_special_tokens`, and `build_chat_ids` (GLM-4's chat format). Its `encode` keeps
`[gMASK] <sop>` in front, as the published GLM-4 tokenizer's does: a `tokenizer.json` without that
post-processor gets it on load. Saved, it is a plain fast tokenizer again (no glmtune class named), so the
folder stays one that transformers opens alone.

GLM-4-9B-Chat's chat_template renders the tools a system message carries; GLM-4-0414's takes them as
`apply_chat_template(tools=...)` and ignores a message's. Tools on a message that the folder's template would
drop from the prompt are refused rather than silently left out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from glmtune.tokenizers.chatglm2 import GLMSpecialTokens
from glmtune.tokenizers.glm4 import GLM4_CHAT_TOKENS, GLM4ChatFormat

# The class a saved folder names: the transformers 4 and 5 name of a plain tokenizer.json tokenizer.
SAVED_CLASS = "PreTrainedTokenizerFast"


class GLM4TokenizerFast(GLMSpecialTokens, GLM4ChatFormat, PreTrainedTokenizerFast):
    """A GLM-4 `tokenizer.json` tokenizer that glmtune's `glm4` templates can use."""

    PREFIX_TOKENS = ("[gMASK]", "<sop>")
    EOS_TOKEN = "<|endoftext|>"

    # No __init__ of its own: transformers then builds the backend from tokenizer.json as it is (a subclass
    # with one gets it rebuilt from the vocabulary alone, without the BPE merges).

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> GLM4TokenizerFast:
        """The folder's tokenizer; ValueError unless it has GLM-4's prefix and role tokens."""
        tokenizer = super().from_pretrained(*args, **kwargs)
        missing = [token for token in GLM4_CHAT_TOKENS if token not in tokenizer.get_added_vocab()]
        if missing:
            raise ValueError(
                f"{tokenizer.name_or_path}: not a GLM-4 tokenizer (its tokenizer.json has no {', '.join(missing)})"
            )
        tokenizer._keep_prefix()
        return tokenizer

    def get_command(self, token: str) -> int:
        """Id of a special token (`"[gMASK]"`, `"<sop>"`, `"<|user|>"`, ...)."""
        commands = self.__dict__.get("_commands")
        if commands is None:
            commands = self.__dict__["_commands"] = dict(self.get_added_vocab())
        if token not in commands:
            raise KeyError(f"{token} is not a special token of {self.name_or_path}")
        return commands[token]

    def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' apply_chat_template; ValueError for tools on a message the chat_template ignores."""
        messages = conversation if conversation and isinstance(conversation[0], Mapping) else []
        if any(m.get("tools") for m in messages) and not args and not kwargs.get("tools"):
            chat_template = kwargs.get("chat_template")
            without = [{k: v for k, v in m.items() if k != "tools"} for m in messages]
            rendered = [
                super(GLM4TokenizerFast, self).apply_chat_template(
                    m, chat_template=chat_template, tokenize=False
                )
                for m in (messages, without)
            ]
            if rendered[0] == rendered[1]:
                raise ValueError(
                    f"{self.name_or_path}: its chat_template does not render the tools of a message (GLM-4-0414's "
                    "takes them as apply_chat_template(tools=...)): tool-call messages need GLM-4-9B-Chat's "
                    "chat_template"
                )
        return super().apply_chat_template(conversation, *args, **kwargs)

    def _keep_prefix(self) -> None:
        """Make `encode` put `[gMASK] <sop>` before the text (a GLM-4 model reads every text after them)."""
        prefix = self.get_prefix_tokens()
        if self._tokenizer.encode("a").ids[: len(prefix)] == prefix:
            return
        specials = list(zip(self.PREFIX_TOKENS, prefix))
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B", special_tokens=specials
        )

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any
    ) -> tuple[str, ...]:
        """As a plain fast tokenizer: the folder names no glmtune class, so transformers loads it alone."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = Path(save_directory) / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config["tokenizer_class"] = SAVED_CLASS
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return files
