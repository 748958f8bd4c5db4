"""The embedded default model: a tiny ChatGLM2 checkpoint folder built from the demo's own data.

It is a real checkpoint in the published layout (config.json, model.safetensors, tokenizer.model), so
every code path that serves published checkpoints serves it too. Building it twice gives identical files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from glmtune.config import TINY_MODEL_PATH, ConfigError, TinyModelArgs, resolve_path
from glmtune.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmtune.models.saving import save_model
from glmtune.tokenizers.chatglm2 import ChatGLM2Tokenizer
from glmtune.tokenizers.train_spm import train_chatglm2_tokenizer

SPECIAL_TOKENS = 9  # [MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|> <|observation|>


def paragraph_texts(files: list[str]) -> Iterator[str]:
    """Each question and answer of paragraph-format files (`[{"paragraph": [{"q", "a"}]}]`, `a` a string or
    a list of lines), in order: the text the tiny tokenizer is trained on."""
    for file in files:
        path = resolve_path(file)
        if not path.is_file():
            raise ConfigError(f"model.tiny.texts: data file not found: {file}")
        try:
            records = json.loads(path.read_text(encoding="utf-8-sig"))
            for record in records:
                for turn in record["paragraph"]:
                    answer = turn["a"]
                    yield turn["q"]
                    yield "\n".join(answer) if isinstance(answer, list) else answer
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(
                f"model.tiny.texts: {file} is not a paragraph-format JSON array ({type(err).__name__}: {err})"
            ) from None


def build_tiny_chatglm2(folder: str | Path, args: TinyModelArgs) -> Path:
    """Train the tokenizer on `args.texts`, initialise weights from `args.seed`, save; atomic."""

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        train_chatglm2_tokenizer(list(paragraph_texts(args.texts)), tmp, vocab_size=args.vocab_size)
        tokenizer = ChatGLM2Tokenizer.from_pretrained(str(tmp))
        vocab = len(tokenizer)
        config = ChatGLM2Config(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            multi_query_attention=True,
            multi_query_group_num=args.multi_query_group_num,
            kv_channels=args.kv_channels,
            ffn_hidden_size=args.ffn_hidden_size,
            padded_vocab_size=(vocab + 63) // 64 * 64,
            seq_length=2048,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            torch_dtype="float32",
        )
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(args.seed)
        try:
            model = ChatGLM2ForConditionalGeneration(config)
        finally:
            torch.random.set_rng_state(generator_state)
        model.glmtune_family = "chatglm2"
        save_model(model, tmp)
        if (folder / "config.json").is_file():
            return folder  # another process built the same model meanwhile (same seed): theirs stays
        if folder.exists():
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a build that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_model(path: str | Path, tiny: TinyModelArgs | None) -> Path:
    """The checkpoint folder for `model.path`, building the tiny default there if asked and absent.

    Only the default folder is ever built: elsewhere a missing checkpoint is the user's mistake (a typo in
    the path), which must not silently become a new random model.
    """
    p = resolve_path(path)
    if (p / "config.json").is_file():
        return p
    if tiny is None or p.resolve() != resolve_path(TINY_MODEL_PATH).resolve():
        what = "does not exist" if not p.exists() else "holds no checkpoint (config.json)"
        raise ConfigError(f"model.path: {path} {what}")
    print(f"building the tiny default model in {p} ...")
    return build_tiny_chatglm2(p, tiny)
