"""ChatGLM-6B (v1) tokenizer: the published `ice_text.model` behind transformers' slow-tokenizer API.

Token ids are those of THUDM/chatglm-6b's `tokenization_chatglm.py`:

- SentencePiece never sees a newline, a tab or a run of spaces: the text is first rewritten with the model's
  user-defined pieces `<n>`, `<|tab|>` and `<|blank_2|>` .. `<|blank_80|>` (ice_text.model normalizes with
  NFKC and drops repeated spaces, so without these escapes code and poetry would not survive).
- Ids are shifted by `num_image_tokens` (20000 in the first release, 0 in the current `tokenizer_config.json`);
  ids below the shift are `<image_N>`.
- `encode` *appends* `[gMASK] <sop>`: GLM generates the blank marked by `[gMASK]`, starting at `<sop>`.
  A (prompt, answer) pair becomes `prompt [gMASK] <sop> answer <eop>`; `<eop>` is the eos token, pad id 3.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import numpy as np
import sentencepiece as spm
from transformers.tokenization_python import PythonBackend
from transformers.utils import PaddingStrategy

TAB_TOKEN = "<|tab|>"
BLANK_RE = re.compile(r"<\|blank_(\d+)\|>")


class SPTokenizer:
    """ice_text.model with ChatGLM-6B's whitespace escapes and image-token id offset."""

    def __init__(self, vocab_file: str, num_image_tokens: int = 0, max_blank_length: int = 80) -> None:
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        self.num_image_tokens = num_image_tokens
        self.max_blank_length = max_blank_length
        # Runs of 2..max spaces, longest first: 85 spaces -> <|blank_80|><|blank_5|>, as the published
        # replace loop (from max_blank_length down to 2) gives.
        self._blank_run = re.compile(f" {{2,{max_blank_length}}}")

    @property
    def num_text_tokens(self) -> int:
        return self.sp.vocab_size()

    @property
    def num_tokens(self) -> int:
        return self.num_image_tokens + self.num_text_tokens

    def preprocess(self, text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", TAB_TOKEN)
        return self._blank_run.sub(lambda m: f"<|blank_{len(m.group())}|>", text)

    def postprocess(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace(TAB_TOKEN, "\t")
        return BLANK_RE.sub(lambda m: " " * int(m.group(1)), text)

    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(self.preprocess(text), out_type=str)

    def encode(self, text: str) -> list[int]:
        return [i + self.num_image_tokens for i in self.sp.encode(self.preprocess(text))]

    def decode(self, ids: list[int]) -> str:
        """Text ids only (no image ids); the escapes are turned back into whitespace."""
        return self.postprocess(self.sp.decode([i - self.num_image_tokens for i in ids]))

    def piece_to_id(self, token: str) -> int:
        if (
            self.num_image_tokens
            and token.startswith("<image_")
            and token.endswith(">")
            and token[7:-1].isdigit()
        ):
            return int(token[7:-1])
        return self.sp.piece_to_id(token) + self.num_image_tokens

    def id_to_piece(self, index: int) -> str | None:
        """The piece for `index`, None when it lies outside the vocabulary (the model's padded rows)."""
        if 0 <= index < self.num_image_tokens:
            return f"<image_{index}>"
        if self.num_image_tokens <= index < self.num_tokens:
            return self.sp.id_to_piece(index - self.num_image_tokens)
        return None


class ChatGLMTokenizer(PythonBackend):
    """ChatGLM-6B tokenizer (a transformers slow tokenizer), ids identical to the published one.

    `published_inputs=True` also returns what the published tokenizer gives the published model: a `[1, L, L]`
    bool attention mask (True = masked; the prompt up to `<sop>` is bidirectional, the rest causal) and `[2, L]`
    position ids (positions, block positions). By default it returns the usual 2D mask (1 = keep).
    """

    vocab_files_names = {"vocab_file": "ice_text.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str,
        do_lower_case: bool = False,
        remove_space: bool = False,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        end_token: str = "</s>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        num_image_tokens: int = 0,
        max_blank_length: int = 80,
        padding_side: str = "left",
        published_inputs: bool = False,
        **kwargs: Any,
    ) -> None:
        # Everything get_vocab() needs must exist before PythonBackend.__init__, which calls it.
        self.vocab_file = vocab_file
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.published_inputs = published_inputs
        self.sp_tokenizer = SPTokenizer(vocab_file, num_image_tokens, max_blank_length)
        self._base_vocab: dict[str, int] | None = None
        if published_inputs:
            kwargs.setdefault("model_input_names", ["input_ids", "attention_mask", "position_ids"])
        super().__init__(
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            bos_token=bos_token,
            eos_token=eos_token,
            end_token=end_token,
            mask_token=mask_token,
            gmask_token=gmask_token,
            pad_token=pad_token,
            unk_token=unk_token,
            num_image_tokens=num_image_tokens,
            max_blank_length=max_blank_length,
            padding_side=padding_side,
            published_inputs=published_inputs,
            **kwargs,
        )

    @classmethod
    def load(cls, folder: str | os.PathLike, **kwargs: Any) -> ChatGLMTokenizer:
        """`from_pretrained` for a local folder (tokenizer_config.json + ice_text.model)."""
        return cls.from_pretrained(str(folder), **kwargs)

    # --- vocabulary -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.sp_tokenizer.num_tokens

    @property
    def num_image_tokens(self) -> int:
        return self.sp_tokenizer.num_image_tokens

    @property
    def max_blank_length(self) -> int:
        return self.sp_tokenizer.max_blank_length

    def get_vocab(self) -> dict[str, int]:
        if self._base_vocab is None:  # 130k pieces: build once
            self._base_vocab = {self.sp_tokenizer.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab = dict(self._base_vocab)
        vocab.update(getattr(self, "_added_tokens_encoder", {}))
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return self.sp_tokenizer.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_tokenizer.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        piece = self.sp_tokenizer.id_to_piece(index)
        return piece if piece is not None else str(self.unk_token)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode(self.convert_tokens_to_ids(tokens))

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Runs of text ids go through SentencePiece together; special/added tokens are written as themselves.

        As published, pad ids are always dropped; ids outside the vocabulary (the model's padded rows) too.
        """
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        skip.add(self.pad_token_id)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in skip:
                continue
            literal = self._added_tokens_decoder.get(i)
            if literal is None and self.num_image_tokens <= i < self.vocab_size:
                run.append(i)
                continue
            if run:
                parts.append(self.sp_tokenizer.decode(run))
                run = []
            if literal is not None:
                parts.append(literal.content)
            elif 0 <= i < self.num_image_tokens:
                parts.append(f"<image_{i}>")
        if run:
            parts.append(self.sp_tokenizer.decode(run))
        text = "".join(parts)
        cleanup = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else clean_up_tokenization_spaces
        )
        return self.clean_up_tokenization(text) if cleanup else text

    # --- special tokens ---------------------------------------------------------------------------------

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """`a [gMASK] <sop>` or, for a (prompt, answer) pair, `a [gMASK] <sop> b <eop>`."""
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

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
        if not self.published_inputs:
            return super()._pad(
                encoded_inputs,
                max_length,
                padding_strategy,
                pad_to_multiple_of,
                padding_side,
                return_attention_mask,
            )
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        ids = list(encoded_inputs["input_ids"])
        length = len(ids)
        # The prompt (context) runs up to <sop>; everything from <sop> on is generated, block by block.
        context = ids.index(self.bos_token_id) if self.bos_token_id in ids else length
        if return_attention_mask and "attention_mask" not in encoded_inputs:
            mask = np.tril(np.ones((1, length, length)))
            mask[:, :, :context] = 1  # every token sees the whole prompt (bidirectional prefix)
            encoded_inputs["attention_mask"] = mask < 0.5  # True = masked
        if "position_ids" not in encoded_inputs:
            # 2D positions: generated tokens all sit at the position of the mask token they fill in, and count
            # their own place in the block (1 at <sop>) in the second row.
            position_ids = np.arange(length, dtype=np.int64)
            mask_id = self.mask_token_id if self.mask_token_id in ids else self.gmask_token_id
            if mask_id in ids:
                position_ids[context:] = ids.index(mask_id)
            block_position_ids = np.concatenate(
                [np.zeros(context, dtype=np.int64), np.arange(1, length - context + 1, dtype=np.int64)]
            )
            encoded_inputs["position_ids"] = np.stack([position_ids, block_position_ids], axis=0)

        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = length
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of != 0:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        if padding_strategy == PaddingStrategy.DO_NOT_PAD or max_length is None or length >= max_length:
            return encoded_inputs
        diff = max_length - length
        left = (padding_side or self.padding_side) == "left"
        before, after = (diff, 0) if left else (0, diff)
        if "attention_mask" in encoded_inputs:
            encoded_inputs["attention_mask"] = np.pad(
                encoded_inputs["attention_mask"],
                [(0, 0), (before, after), (before, after)],
                constant_values=True,
            )
        encoded_inputs["position_ids"] = np.pad(encoded_inputs["position_ids"], [(0, 0), (before, after)])
        for key, value in (("token_type_ids", self.pad_token_type_id), ("special_tokens_mask", 1)):
            if key in encoded_inputs:
                encoded_inputs[key] = [value] * before + list(encoded_inputs[key]) + [value] * after
        encoded_inputs["input_ids"] = [self.pad_token_id] * before + ids + [self.pad_token_id] * after
        return encoded_inputs

    # --- saving -----------------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"vocabulary path ({save_directory}) should be a directory")
        out = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + "ice_text.model"
        )
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(out):
                shutil.copyfile(self.vocab_file, out)
        else:
            with open(out, "wb") as f:
                f.write(self.sp_tokenizer.sp.serialized_model_proto())
        return (out,)
