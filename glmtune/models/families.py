"""Which model a checkpoint folder or a loaded model is: ChatGLM-6B, ChatGLM2, ChatGLM3, GLM-4, or any other
("hf").

ChatGLM-6B has its own network and config schema (`position_encoding_2d`, `inner_hidden_size`). ChatGLM2 and
ChatGLM3 share network and config schema and differ only in the chat format, which the published configs do
not record. GLM-4-9B-Chat publishes the same schema and network (a larger rotary base through `rope_ratio`)
with a tiktoken vocabulary instead of SentencePiece, which is how its folder is told apart. `save_model` writes a `glmtune_family` key, and `load_model` sets `glmtune_family` on the model
and its config, so the distinction survives a round trip.

Transformers' own GLM classes (`GlmForCausalLM`, model_type "glm": THUDM/glm-4-9b-chat-hf and glmtune's
`--merge_format transformers` folders; `Glm4ForCausalLM`, "glm4": GLM-4-0414) are "hf" models: transformers
loads them. With GLM-4's vocabulary they chat in GLM-4's format all the same, which `chat_family` tells.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from torch import nn

from glmtune.models.reading import CheckpointError, read_config
from glmtune.tokenizers.glm4 import GLM4_CHAT_TOKENS

Family = Literal["chatglm", "chatglm2", "chatglm3", "glm4", "hf"]
CHATGLM_FAMILIES: tuple[str, ...] = ("chatglm", "chatglm2", "chatglm3", "glm4")
# GLM-4's vocabulary size; ChatGLM2/3 pad theirs to 65024.
GLM4_PADDED_VOCAB_SIZE = 151552
# model_type of transformers' GlmForCausalLM and Glm4ForCausalLM.
GLM_HF_MODEL_TYPES = ("glm", "glm4")


def _schema_family(config: Mapping[str, Any]) -> Literal["chatglm", "chatglm2", "hf"]:
    """What the config schema alone tells: ChatGLM-6B, ChatGLM2/3 (returned as "chatglm2"), or another model."""
    if config.get("model_type") != "chatglm":
        return "hf"
    if "position_encoding_2d" in config or "inner_hidden_size" in config:
        return "chatglm"
    return "chatglm2"


def _has_role_tokens(folder: Path) -> bool:
    """ChatGLM3's tokenizer files name its role tokens; ChatGLM2's (same tokenizer.model) do not."""
    for name in ("tokenizer_config.json", "tokenization_chatglm.py", "special_tokens_map.json"):
        file = folder / name
        if file.is_file() and "<|user|>" in file.read_text(encoding="utf-8", errors="replace"):
            return True
    return False


def _has_tiktoken_vocab(folder: Path, config: Mapping[str, Any]) -> bool:
    """GLM-4's tokenizer.model is text, `base64(bytes) rank` per line; ChatGLM2/3's is a SentencePiece proto
    (binary). Without the file, the vocabulary size tells."""
    file = folder / "tokenizer.model"
    if not file.is_file():
        return config.get("padded_vocab_size") == GLM4_PADDED_VOCAB_SIZE
    with open(file, "rb") as f:
        first = f.readline(512).split()
    return len(first) == 2 and first[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/]+=*", first[0]) is not None


def detect_family(path: str | os.PathLike, config: dict | None = None) -> Family:
    """ChatGLM-6B, ChatGLM2, ChatGLM3 or GLM-4 from the published config (and files), else "hf".

    Within the ChatGLM2 schema: an explicit `glmtune_family` key, then GLM-4's tiktoken vocabulary, then the
    tokenizer files (ChatGLM3's name its role tokens, and so do GLM-4's: hence GLM-4 first), then
    `_name_or_path` and the folder name, in that order.
    """
    folder = Path(path)
    config = config if config is not None else read_config(folder)
    schema = _schema_family(config)
    if schema != "chatglm2":
        return schema
    family = config.get("glmtune_family")
    if family is not None:
        if family not in ("chatglm2", "chatglm3", "glm4"):
            raise CheckpointError(
                f"{folder / 'config.json'}: glmtune_family {family!r} does not fit a ChatGLM2/3 config "
                "(expected 'chatglm2', 'chatglm3' or 'glm4')"
            )
        return family
    if _has_tiktoken_vocab(folder, config):
        return "glm4"
    if _has_role_tokens(folder):
        return "chatglm3"
    names = f"{config.get('_name_or_path', '')} {folder.resolve().name}".lower()
    if "chatglm3" in names:
        return "chatglm3"
    return "chatglm2"


def resolve_family(path: str | os.PathLike, family: str = "auto") -> Family:
    """`family` as configured (`model.family`): detected from the folder for "auto", else checked and kept."""
    if family in ("auto", None):
        return detect_family(path)
    if family not in get_args(Family):
        raise ValueError(f"family {family!r}: expected 'auto' or one of {get_args(Family)}")
    return family  # type: ignore[return-value]


def model_family(model: nn.Module) -> Family:
    """The family of a loaded model (or a PEFT wrapper of one): the `glmtune_family` that `load_model` set on
    it or its config, else what its config schema tells (a ChatGLM2/3 built directly counts as ChatGLM2)."""
    config = getattr(model, "config", None)
    declared = getattr(model, "glmtune_family", None) or getattr(config, "glmtune_family", None)
    if declared is not None:
        return declared
    return _schema_family(config.to_dict()) if config is not None else "hf"


def _added_tokens(folder: Path) -> set[str]:
    """The added (special) tokens a transformers tokenizer folder lists: tokenizer_config.json's
    `added_tokens_decoder`, else tokenizer.json's `added_tokens`."""
    names: set[str] = set()
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        decoder = json.loads(config_file.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        names = {v.get("content") if isinstance(v, Mapping) else str(v) for v in decoder.values()}
    tokenizer_file = folder / "tokenizer.json"
    if not names.issuperset(GLM4_CHAT_TOKENS) and tokenizer_file.is_file():
        names |= {token.get("content") for token in _tokenizer_json_added_tokens(tokenizer_file)}
    return names


def _tokenizer_json_added_tokens(file: Path) -> list[dict]:
    """tokenizer.json's `added_tokens` list. The file (20 MB for GLM-4) writes that key before the
    vocabulary, so only the list is parsed; the whole file where that fails."""
    text = file.read_text(encoding="utf-8")
    key = re.search(r'"added_tokens"\s*:\s*', text)
    if key is not None:
        try:
            added, _ = json.JSONDecoder().raw_decode(text, key.end())
            if isinstance(added, list):
                return added
        except json.JSONDecodeError:
            pass
    return json.loads(text).get("added_tokens") or []


def chat_family(path: str | os.PathLike, family: str) -> str:
    """The family whose chat format (template, tokenizer) a model folder of `family` is prompted in: `family`
    itself, but "glm4" for a transformers-native GLM folder (`GLM_HF_MODEL_TYPES`) whose tokenizer has GLM-4's
    prefix and role tokens, which loads as "hf" and chats as GLM-4. (A ChatGLM2/3 exported as GlmForCausalLM
    keeps its SentencePiece vocabulary and stays "hf".)"""
    folder = Path(path)
    if family != "hf" or not (folder / "config.json").is_file():
        return family
    if read_config(folder).get("model_type") not in GLM_HF_MODEL_TYPES:
        return family
    return "glm4" if _added_tokens(folder).issuperset(GLM4_CHAT_TOKENS) else family
