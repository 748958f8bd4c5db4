"""GLM-4-9B-Chat tokenizer: tiktoken byte-level BPE (`tokenizer.model`) plus 14 special tokens.

Token ids are those of the published THUDM/glm-4-9b-chat `tokenization_chatglm.py` (`ChatGLM4Tokenizer`):

- `tokenizer.model` is a text file of `base64(token bytes) rank` lines (151329 ranks); the text is split by the
  published pre-tokenizer pattern, then merged by rank (tiktoken).
- The special tokens get the ids right after the ranks, in the order of `SPECIAL_TOKENS` (151329-151342).
  Unlike ChatGLM2/3's command tokens they are matched in the text: `"<|user|>"` in a text is the one token.
- `encode` prepends `[gMASK] <sop>`. eos and pad are `<|endoftext|>`, there is no bos; padding is on the left.
- Chat prompts are the published `chat_template` (`[gMASK]<sop><|role|>{metadata}\\n{content}...`, then
  `<|assistant|>`), which `build_chat_ids` writes without going through Jinja.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import tiktoken
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.tokenization_python import PythonBackend

from glmtune.tokenizers.chatglm2 import GLMSpecialTokens

ROLES = ("system", "user", "assistant", "observation")
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    *(f"<|{role}|>" for role in ROLES),
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
# What a GLM-4 chat needs of a tokenizer: its prefix and role tokens (ChatGLM2/3's prefix is `[gMASK] sop`).
GLM4_CHAT_TOKENS = ("[gMASK]", "<sop>", *(f"<|{role}|>" for role in ROLES))
# The published pre-tokenizer (cl100k's, with letters and digits of every script).
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """The `base64(bytes) rank` lines of a tiktoken BPE file.

    Read here rather than by `tiktoken.load.load_tiktoken_bpe`, which keeps a copy in a temporary cache keyed
    by the path alone: a file replaced at the same path would be read from the stale copy.
    """
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as e:
                raise ValueError(f"{path}, line {number}: expected 'base64-token rank', got {line!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


class GLM4ChatFormat:
    """GLM-4's chat prompts as ids, for any tokenizer of its vocabulary that matches `<|role|>` in a text as the
    role token (glmtune's `GLM4Tokenizer`, and the transformers-native one of glm4_fast.py)."""

    @staticmethod
    def chat_text(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The published `chat_template` for messages without tools: `<|role|>{metadata}\\n{content}` for each
        message with content (it leaves out empty ones), after `[gMASK]<sop>`; `<|assistant|>` to prompt."""
        text = "[gMASK]<sop>"
        for message in messages:
            if message.get("tools") is not None:
                raise ValueError(
                    "messages with tools: render them with apply_chat_template (the published chat_template)"
                )
            if message.get("role") not in ROLES:
                raise ValueError(f"message role must be one of {ROLES}, got {message.get('role')!r}")
            if message["content"]:
                text += f"<|{message['role']}|>{message.get('metadata') or ''}\n{message['content']}"
        return text + ("<|assistant|>" if add_generation_prompt else "")

    def build_chat_ids(
        self,
        query: str,
        history: Sequence[Mapping[str, Any] | Sequence[str]] | None = None,
        role: str = "user",
    ) -> list[int]:
        """The ids of the published chat prompt: `history` (messages or (query, response) pairs), then the
        query as a `role` message, then `<|assistant|>`."""
        messages: list[Mapping[str, Any]] = []
        for item in history or []:
            if isinstance(item, Mapping):
                messages.append(item)
            else:
                old_query, response = item
                messages += [
                    {"role": "user", "content": old_query},
                    {"role": "assistant", "content": response},
                ]
        messages.append({"role": role, "content": query})
        return self.encode(self.chat_text(messages), add_special_tokens=False)


class GLM4Tokenizer(GLMSpecialTokens, GLM4ChatFormat, PythonBackend):
    """GLM-4-9B-Chat tokenizer (a transformers slow tokenizer), ids identical to the published one.

    Tokens are written as byte-level strings (GPT-2's byte-to-character map), so the vocabulary has str keys.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    PREFIX_TOKENS = ("[gMASK]", "<sop>")
    EOS_TOKEN = "<|endoftext|>"

    def __init__(
        self,
        vocab_file: str,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        # Everything get_vocab() needs must exist before PythonBackend.__init__, which calls it.
        self.vocab_file = vocab_file
        self.mergeable_ranks = read_ranks(vocab_file)
        self.encoding = tiktoken.Encoding(
            name="glm4", pat_str=PATTERN, mergeable_ranks=self.mergeable_ranks, special_tokens={}
        )
        self.n_ranks = len(self.mergeable_ranks)
        self.special_tokens = {token: self.n_ranks + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.index_special_tokens = {i: token for token, i in self.special_tokens.items()}
        self.byte_chars = bytes_to_unicode()
        self.char_bytes = {c: b for b, c in self.byte_chars.items()}
        self.pieces = [""] * self.n_ranks
        for token, rank in self.mergeable_ranks.items():
            self.pieces[rank] = "".join(self.byte_chars[b] for b in token)
        self.piece_ids = {piece: i for i, piece in enumerate(self.pieces)}

        kwargs.setdefault("eos_token", "<|endoftext|>")
        kwargs.setdefault("pad_token", "<|endoftext|>")
        extra = [str(t) for t in kwargs.pop("extra_special_tokens", None) or []]
        kwargs["extra_special_tokens"] = list(dict.fromkeys([*SPECIAL_TOKENS, *extra]))
        kwargs.setdefault("split_special_tokens", False)  # published: special tokens in the text are tokens
        super().__init__(
            padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs
        )

    # --- vocabulary -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.n_ranks + len(self.special_tokens)

    def get_command(self, token: str) -> int:
        """Id of a special token (`"[gMASK]"`, `"<sop>"`, `"<|user|>"`, ...)."""
        if token not in self.special_tokens:
            raise KeyError(f"{token} is not a special token of {type(self).__name__}")
        return self.special_tokens[token]

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self.piece_ids)
        vocab.update(self.special_tokens)
        vocab.update(getattr(self, "_added_tokens_encoder", {}))
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [self.pieces[i] for i in self.encoding.encode_ordinary(text)]

    def _convert_token_to_id(self, token: str) -> int | None:
        """None for a token outside the vocabulary: there is no unknown token (as for GPT-2 without one)."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.piece_ids.get(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        if 0 <= index < self.n_ranks:
            return self.pieces[index]
        raise IndexError(f"token id {index} is outside the vocabulary of {type(self).__name__}")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode(self.convert_tokens_to_ids(tokens))

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Runs of BPE ids decode together (a character may span tokens); special/added tokens are written as
        themselves. Ids outside the vocabulary (the model's padded embedding rows) are dropped."""
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        skip = set(self.all_special_ids) | set(self.index_special_tokens) if skip_special_tokens else set()
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in skip:
                continue
            literal = self._added_tokens_decoder.get(i)
            if literal is None and 0 <= i < self.n_ranks:
                run.append(i)
                continue
            if run:
                parts.append(self.encoding.decode(run, errors="replace"))
                run = []
            if literal is not None:
                parts.append(literal.content)
            elif i in self.index_special_tokens:
                parts.append(self.index_special_tokens[i])
        if run:
            parts.append(self.encoding.decode(run, errors="replace"))
        text = "".join(parts)
        cleanup = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else clean_up_tokenization_spaces
        )
        return self.clean_up_tokenization(text) if cleanup else text

    # --- saving -----------------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"vocabulary path ({save_directory}) should be a directory")
        out = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        )
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(out):
                shutil.copyfile(self.vocab_file, out)
        else:
            with open(out, "wb") as f:
                for token, rank in sorted(self.mergeable_ranks.items(), key=lambda item: item[1]):
                    f.write(base64.b64encode(token) + b" %d\n" % rank)
        return (out,)
