"""ChatGLM2-6B and ChatGLM3-6B tokenizers: one SentencePiece BPE model (`tokenizer.model`) plus command tokens.

Token ids are those of the published THUDM/chatglm2-6b and THUDM/chatglm3-6b `tokenization_chatglm.py`:

- Plain SentencePiece (identity normalization, byte fallback: newlines and tabs are bytes `<0x0A>`, `<0x09>`).
- The command tokens are not in the SentencePiece model; they get the ids right after it, in this order:
  `[MASK] [gMASK] [sMASK] sop eop` (ChatGLM2), then `<|system|> <|user|> <|assistant|> <|observation|>` (ChatGLM3).
- `encode` *prepends* `[gMASK] sop`; a (prompt, answer) pair is `[gMASK] sop a b </s>`. eos is `</s>` (id 2),
  pad is `<unk>` (id 0), there is no bos.
- As published, command tokens written in the text are plain text (`"<|user|>"` is 5 ordinary pieces) unless
  `encode_special_tokens=True`; chat prompts put them in as ids (`ChatGLM3Tokenizer.build_chat_input`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import sentencepiece as spm
from transformers.tokenization_python import PythonBackend, Trie
from transformers.tokenization_utils_base import BatchEncoding
from transformers.utils import PaddingStrategy

ROLES = ("system", "user", "assistant", "observation")


class GLMSpecialTokens:
    """The `[gMASK] sop` prefix and the closing eos of a (prompt, answer) pair, shared by the ChatGLM2/3 and
    GLM-4 tokenizers, which name those tokens differently (`PREFIX_TOKENS`, `EOS_TOKEN`)."""

    PREFIX_TOKENS: tuple[str, str] = ("[gMASK]", "sop")
    EOS_TOKEN = "<eos>"

    def get_prefix_tokens(self) -> list[int]:
        return [self.get_command(token) for token in self.PREFIX_TOKENS]

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """`[gMASK] sop a` or, for a (prompt, answer) pair, `[gMASK] sop a b eos`."""
        ids = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.get_command(self.EOS_TOKEN)]
        return ids

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask


class ChatGLM2Tokenizer(GLMSpecialTokens, PythonBackend):
    """ChatGLM2-6B tokenizer (a transformers slow tokenizer), ids identical to the published one.

    `published_inputs=True` also returns `position_ids` (0 on padding, 0.. on the tokens) as the published
    tokenizer does; by default the output is `input_ids` + `attention_mask` (1 = keep).
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    command_tokens: ClassVar[tuple[str, ...]] = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")

    def __init__(
        self,
        vocab_file: str,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        encode_special_tokens: bool | None = None,
        published_inputs: bool = False,
        **kwargs: Any,
    ) -> None:
        # Everything get_vocab() needs must exist before PythonBackend.__init__, which calls it.
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        self.n_sp = self.sp_model.vocab_size()
        self.special_tokens = {tok: self.n_sp + i for i, tok in enumerate(self.command_tokens)}
        self.index_special_tokens = {i: tok for tok, i in self.special_tokens.items()}
        self.published_inputs = published_inputs
        self._base_vocab: dict[str, int] | None = None

        unk = self.sp_model.id_to_piece(self.sp_model.unk_id())
        kwargs.setdefault("eos_token", self.sp_model.id_to_piece(self.sp_model.eos_id()))
        kwargs.setdefault("unk_token", unk)
        kwargs.setdefault("pad_token", unk)  # published: pad id = unk id = 0
        # Command tokens are special (skipped by decode(skip_special_tokens=True), counted in all_special_ids);
        # whether the text may spell them is `encode_special_tokens` (= not transformers' split_special_tokens).
        extra = [str(t) for t in kwargs.pop("extra_special_tokens", None) or []]
        kwargs["extra_special_tokens"] = list(dict.fromkeys([*self.command_tokens, *extra]))
        split = kwargs.pop("split_special_tokens", None)
        if encode_special_tokens is not None:
            split = not encode_special_tokens
        kwargs["split_special_tokens"] = True if split is None else bool(split)
        if published_inputs:
            kwargs.setdefault("model_input_names", ["input_ids", "attention_mask", "position_ids"])
        super().__init__(
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            published_inputs=published_inputs,
            **kwargs,
        )

    @classmethod
    def load(cls, folder: str | os.PathLike, **kwargs: Any) -> ChatGLM2Tokenizer:
        """`from_pretrained` for a local folder (tokenizer_config.json + tokenizer.model)."""
        return cls.from_pretrained(str(folder), **kwargs)

    @property
    def encode_special_tokens(self) -> bool:
        """Published ChatGLM3 switch: True lets `"<|user|>"`, `"[gMASK]"`, ... in the text become the tokens."""
        return not self.split_special_tokens

    @encode_special_tokens.setter
    def encode_special_tokens(self, value: bool) -> None:
        self.split_special_tokens = not value

    # --- vocabulary -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.n_sp + len(self.special_tokens)

    def get_command(self, token: str) -> int:
        """Id of a command token (`"[gMASK]"`, `"sop"`, `"<|user|>"`, ...) or of `<bos>`/`<eos>`/`<pad>`/`<unk>`."""
        named = {
            "<bos>": self.sp_model.bos_id(),
            "<eos>": self.sp_model.eos_id(),
            "<pad>": self.sp_model.unk_id(),
            "<unk>": self.sp_model.unk_id(),
        }
        if token in named:
            return named[token]
        if token not in self.special_tokens:
            raise KeyError(f"{token} is not a command token of {type(self).__name__}")
        return self.special_tokens[token]

    def get_vocab(self) -> dict[str, int]:
        if self._base_vocab is None:
            self._base_vocab = {self.sp_model.id_to_piece(i): i for i in range(self.n_sp)}
            self._base_vocab.update(self.special_tokens)
        vocab = dict(self._base_vocab)
        vocab.update(getattr(self, "_added_tokens_encoder", {}))
        return vocab

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        split = kwargs.get("split_special_tokens", self.split_special_tokens)
        added = tuple(t for t, i in self._added_tokens_encoder.items() if i >= self.vocab_size)
        if not split or not added:
            return super().tokenize(text, **kwargs)
        # Command tokens stay plain text, but tokens added after loading (ids past the vocabulary) still match.
        if getattr(self, "_added_trie_tokens", None) != added:
            self._added_trie, self._added_trie_tokens = Trie(), added
            for token in added:
                self._added_trie.add(token)
        kwargs["split_special_tokens"] = True
        tokens: list[str] = []
        for chunk in self._added_trie.split(text):
            tokens += [chunk] if chunk in added else super().tokenize(chunk, **kwargs)
        return tokens

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        if 0 <= index < self.n_sp:
            return self.sp_model.id_to_piece(index)
        return str(self.unk_token)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode(self.convert_tokens_to_ids(tokens))

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Runs of SentencePiece ids decode together; special/added tokens are written as themselves.

        Ids outside the vocabulary (the model's padded embedding rows) are dropped.
        """
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        # command tokens too: add_special_tokens({"additional_special_tokens": ...}) replaces the extra list
        skip = set(self.all_special_ids) | set(self.index_special_tokens) if skip_special_tokens else set()
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in skip:
                continue
            literal = self._added_tokens_decoder.get(i)
            if literal is None and 0 <= i < self.n_sp:
                run.append(i)
                continue
            if run:
                parts.append(self.sp_model.decode(run))
                run = []
            if literal is not None:
                parts.append(literal.content)
            elif i in self.index_special_tokens:
                parts.append(self.index_special_tokens[i])
        if run:
            parts.append(self.sp_model.decode(run))
        text = "".join(parts)
        cleanup = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else clean_up_tokenization_spaces
        )
        return self.clean_up_tokenization(text) if cleanup else text

    # --- special tokens and prompts ---------------------------------------------------------------------

    def build_prompt(self, query: str, history: Sequence[tuple[str, str]] | None = None) -> str:
        """ChatGLM2's chat prompt (published `build_prompt`): rounds counted from 1, blank lines around 问/答."""
        prompt = ""
        for i, (old_query, response) in enumerate(history or []):
            prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
        prompt += f"[Round {len(history or []) + 1}]\n\n问：{query}\n\n答："
        return prompt

    # --- padding ----------------------------------------------------------------------------------------

    def _pad(
        self,
        encoded_inputs: dict[str, Any],
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict[str, Any]:
        if self.published_inputs and "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = list(range(len(encoded_inputs["input_ids"])))
        length = len(encoded_inputs["input_ids"])
        out = super()._pad(
            encoded_inputs,
            max_length,
            padding_strategy,
            pad_to_multiple_of,
            padding_side,
            return_attention_mask,
        )
        diff = len(out["input_ids"]) - length
        if diff and "position_ids" in out:
            left = (padding_side or self.padding_side) == "left"
            out["position_ids"] = (
                [0] * diff + out["position_ids"] if left else out["position_ids"] + [0] * diff
            )
        return out

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
                f.write(self.sp_model.serialized_model_proto())
        return (out,)


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM3-6B tokenizer: ChatGLM2's plus the role tokens `<|system|> <|user|> <|assistant|> <|observation|>`.

    A chat message is `<|role|>` + the ids of `f"{metadata}\\n"` + the ids of the content; the model's answer
    starts after a final `<|assistant|>` and ends with eos, `<|user|>` or `<|observation|>` (a tool call).
    """

    command_tokens: ClassVar[tuple[str, ...]] = ChatGLM2Tokenizer.command_tokens + tuple(
        f"<|{r}|>" for r in ROLES
    )

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        role_tokens = [self.get_command(f"<|{role}|>")] + self.sp_model.encode(f"{metadata}\n")
        return role_tokens + self.sp_model.encode(message)

    def build_message(self, message: Mapping[str, Any]) -> list[int]:
        """One published message (`{"role", "content", "metadata"?, "tools"?}`) as `build_chat_input` writes it
        in a history: a system message's tools follow its content as indented JSON."""
        content = message["content"]
        if message["role"] == "system" and message.get("tools") is not None:
            content = content + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        return self.build_single_message(message["role"], message.get("metadata") or "", content)

    def build_chat_ids(
        self,
        query: str,
        history: Sequence[Mapping[str, Any] | Sequence[str]] | None = None,
        role: str = "user",
    ) -> list[int]:
        """`[gMASK] sop` + the history messages + the query message + `<|assistant|>`, as ids.

        `history` holds published ChatGLM3 messages (`{"role", "content", "metadata"?, "tools"?}`) or
        (query, response) pairs.
        """
        ids: list[int] = []
        for item in history or []:
            if isinstance(item, Mapping):
                ids += self.build_message(item)
            else:
                old_query, response = item
                ids += self.build_single_message("user", "", old_query)
                ids += self.build_single_message("assistant", "", response)
        ids += self.build_single_message(role, "", query)
        ids.append(self.get_command("<|assistant|>"))
        return self.build_inputs_with_special_tokens(ids)

    def build_chat_input(
        self,
        query: str,
        history: Sequence[Mapping[str, Any] | Sequence[str]] | None = None,
        role: str = "user",
        return_tensors: str | None = "pt",
    ) -> BatchEncoding:
        """Published `build_chat_input`: a batch of one chat prompt (input_ids, attention_mask)."""
        ids = self.build_chat_ids(query, history, role)
        return self.prepare_for_model(
            ids,
            add_special_tokens=False,
            return_tensors=return_tensors,
            prepend_batch_axis=return_tensors is not None,
        )
