"""Which model a checkpoint folder or a loaded model is: ChatGLM-6B, ChatGLM2, ChatGLM3, or any other ("hf").

ChatGLM-6B has its own network and config schema (`position_encoding_2d`, `inner_hidden_size`). ChatGLM2 and
ChatGLM3 share network and config schema and differ only in the chat format, which the published configs do
not record: `save_model` writes a `glmtune_family` key, and `load_model` sets `glmtune_family` on the model
and its config, so the distinction survives a round trip.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from torch import nn

from glmtune.models.reading import CheckpointError, read_config

Family = Literal["chatglm", "chatglm2", "chatglm3", "hf"]
CHATGLM_FAMILIES: tuple[str, ...] = ("chatglm", "chatglm2", "chatglm3")


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


def detect_family(path: str | os.PathLike, config: dict | None = None) -> Family:
    """ChatGLM-6B, ChatGLM2 or ChatGLM3 from the published config (and files), else "hf".

    ChatGLM2 vs ChatGLM3: an explicit `glmtune_family` key, then the tokenizer files (ChatGLM3's name its role
    tokens), then `_name_or_path` and the folder name, in that order.
    """
    folder = Path(path)
    config = config if config is not None else read_config(folder)
    schema = _schema_family(config)
    if schema != "chatglm2":
        return schema
    family = config.get("glmtune_family")
    if family is not None:
        if family not in ("chatglm2", "chatglm3"):
            raise CheckpointError(
                f"{folder / 'config.json'}: glmtune_family {family!r} does not fit a ChatGLM2/3 config "
                "(expected 'chatglm2' or 'chatglm3')"
            )
        return family
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
