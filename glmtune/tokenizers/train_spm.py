"""Train a small ChatGLM2-style SentencePiece tokenizer (for tiny models built from our own texts).

The result has the published ChatGLM2 layout and settings: `tokenizer.model` (identity normalization, so spaces,
tabs and case survive; byte fallback, so any text round-trips; digits split; unk=0, bos=1, eos=2, no pad piece)
and `tokenizer_config.json`. `ChatGLM2Tokenizer` / `ChatGLM3Tokenizer` load the folder and append their command
tokens after the n_sp pieces: `[MASK] [gMASK] [sMASK] sop eop` (+ the four ChatGLM3 role tokens) = ids n_sp..n_sp+8.

Training is single-threaded over the texts in the given order, with no sampling or shuffling, so the same texts
give a byte-identical `tokenizer.model`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import sentencepiece as spm

# tokenizer_config.json of the published chatglm2-6b (minus its hub-only keys).
CHATGLM2_TOKENIZER_CONFIG = {
    "remove_space": False,
    "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer",
}


def train_chatglm2_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 4096,
    model_type: Literal["bpe", "unigram"] = "bpe",
    character_coverage: float = 0.9995,
    max_sentencepiece_length: int = 16,
) -> Path:
    """Train on `texts` and write `out_dir/tokenizer.model` + `out_dir/tokenizer_config.json`; returns out_dir.

    Texts are split into lines: newlines never become pieces and encode as the byte `<0x0A>`, as in ChatGLM2.
    `vocab_size` counts SentencePiece pieces only (3 meta + 256 bytes + characters + merges; a soft limit
    when the texts cannot fill it); the tokenizer's vocabulary is that plus the command tokens.
    Characters rarer than `character_coverage` get no piece and go through byte fallback.
    """
    lines = [line for text in texts for line in text.split("\n") if line]
    if not lines:
        raise ValueError("no text to train the tokenizer on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=character_coverage,
            max_sentencepiece_length=max_sentencepiece_length,
            # ChatGLM2's normalizer and special ids
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            # reproducibility: every line, in order, one thread
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as e:
        if "smaller than required_chars" in str(e):
            raise ValueError(
                f"vocab_size={vocab_size} is too small for the characters of these texts ({e}); "
                "raise vocab_size or lower character_coverage"
            ) from e
        raise
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps(CHATGLM2_TOKENIZER_CONFIG, indent=2) + "\n")
    return out
