"""Chat prompts and supervised training samples, one template per chat format.

A template wraps a tokenizer and knows:

- `build_chat_prompt(query, history, system)`: what the model sees before it answers, as the published `chat()`
  builds it (`ChatPrompt.text`, None where the format only exists as ids, and `ChatPrompt.input_ids`);
- `build_train_sample(query, response, history, system)`: `(input_ids, labels)` with -100 on the prompt, as the
  published fine-tuning scripts build them;
- `build_dialogue_sample(turns, system)`: one sample for a whole dialogue with every answer supervised; its
  ids are the chat prompt of the last turn (earlier turns as history) followed by the last answer, so training
  sees exactly what chat() will show the model (see `ChatTemplate.build_dialogue_sample` for what is
  supervised);
- `stop_token_ids`: the ids that end an answer;
- `protected_head` / `protected_tail`: how many prompt tokens at the start / end are structural (`[gMASK] sop`,
  bos, ...) and must survive truncation.

ChatGLM templates ("chatglm", "chatglm2", "chatglm3", "chatglm3_plain", "glm4", "glm4_per_message") reproduce
THUDM's code token for token; "llama2", "chatml" and "alpaca" (in other_prompts.py) work with any
transformers tokenizer. `history`
is a list of (query, response) pairs or of `{"role", "content"}` messages. Formats without a system slot
(ChatGLM-6B, ChatGLM2) put `system` before the first query, on its own line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

from transformers import PreTrainedTokenizerBase

from glmtune.data.samples import IGNORE_INDEX
from glmtune.tokenizers.chatglm2 import ChatGLM2Tokenizer
from glmtune.tokenizers.tool_prompts import build_messages_sample, messages_prompt_ids

History = Sequence[Sequence[str] | Mapping[str, Any]]
Parts = list[tuple[str, bool]]  # prompt text in pieces; True marks an (earlier) answer to supervise


class ChatPrompt(NamedTuple):
    text: str | None  # None when the format is defined on ids only (ChatGLM3 role tokens)
    input_ids: list[int]


class TrainSample(NamedTuple):
    input_ids: list[int]
    labels: list[int]


def as_pairs(history: History | None) -> list[tuple[str, str]]:
    """(query, response) pairs from pairs or from alternating user/assistant messages."""
    pairs: list[tuple[str, str]] = []
    pending: str | None = None
    for item in history or []:
        if not isinstance(item, Mapping):
            query, response = item
            pairs.append((query, response))
            continue
        role, content = item["role"], item["content"]
        if role == "user" and pending is None:
            pending = content
        elif role == "assistant" and pending is not None:
            pairs.append((pending, content))
            pending = None
        else:
            raise ValueError(f"this template takes alternating user/assistant messages, got {role!r} here")
    if pending is not None:
        raise ValueError("history ends with a user message that has no answer")
    return pairs


def system_in_first_query(
    query: str, history: History | None, system: str | None
) -> tuple[str, list[tuple[str, str]]]:
    """For formats without a system slot: `system\\n` before the first query (of the history, else `query`)."""
    pairs = as_pairs(history)
    if not system:
        return query, pairs
    if pairs:
        pairs[0] = (f"{system}\n{pairs[0][0]}", pairs[0][1])
        return query, pairs
    return f"{system}\n{query}", pairs


def special_token_counts(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before / after a text (bos, `[gMASK] sop`, ...)."""
    sentinel = -7
    try:
        ids = list(tokenizer.build_inputs_with_special_tokens([sentinel]))
        i = ids.index(sentinel)
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return 0, 0
    return i, len(ids) - i - 1


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    if len(a) <= len(b) and b[: len(a)] == a:
        return len(a)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SentencePieceIds:
    """`tokenizer.encode(text, add_special_tokens=False)` of the ChatGLM2/3 tokenizer, by SentencePiece itself.

    transformers' slow path turns every piece into a string and back through Python dicts, which costs ~10x
    SentencePiece's own encode; the ids are the same as long as command tokens in the text stay plain text
    (`encode_special_tokens` off) and nothing was added to the vocabulary, so each call checks that and falls
    back to the tokenizer otherwise.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.safe_count = len(tokenizer._added_tokens_encoder) if self.added_are_safe() else -1

    def added_are_safe(self) -> bool:
        """The added tokens are the command tokens (ids past SentencePiece's, none of them a piece of it)."""
        sp = self.tokenizer.sp_model
        unk = sp.unk_id()
        return all(
            i < self.tokenizer.vocab_size and (i < sp.vocab_size() or sp.piece_to_id(t) == unk)
            for t, i in self.tokenizer._added_tokens_encoder.items()
        )

    def __call__(self, text: str) -> list[int]:
        tokenizer = self.tokenizer
        # A token added since (or encode_special_tokens switched on) changes the ids: ask the tokenizer.
        if len(tokenizer._added_tokens_encoder) == self.safe_count and tokenizer.split_special_tokens:
            return tokenizer.sp_model.encode(text)
        return tokenizer.encode(text, add_special_tokens=False)

    @classmethod
    def applies_to(cls, tokenizer: Any) -> bool:

        kind = type(tokenizer)
        return (
            isinstance(tokenizer, ChatGLM2Tokenizer)
            and kind.tokenize is ChatGLM2Tokenizer.tokenize
            and kind._tokenize is ChatGLM2Tokenizer._tokenize
            and kind._convert_token_to_id is ChatGLM2Tokenizer._convert_token_to_id
            and kind.prepare_for_tokenization is ChatGLM2Tokenizer.prepare_for_tokenization
            and kind.build_inputs_with_special_tokens is ChatGLM2Tokenizer.build_inputs_with_special_tokens
        )


class ChatTemplate:
    """A chat format bound to a tokenizer. Subclasses define `build_chat_prompt`, `labelled_prompt` and, where
    needed, the rest.

    `dialogue_unsupported`: why this format cannot supervise the answers inside a prompt (then
    `build_dialogue_sample` raises ValueError with it), or None.
    """

    name: ClassVar[str]
    protected_head: int = 0
    protected_tail: int = 0
    dialogue_unsupported: str | None = None
    supports_tools: ClassVar[bool] = False  # whether `build_messages_prompt` can render tools and tool calls

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._fast = SentencePieceIds(tokenizer) if SentencePieceIds.applies_to(tokenizer) else None
        self.special_head = special_token_counts(tokenizer)[0]
        if self._fast is not None:  # ChatGLM2/3: `[gMASK] sop` before every text, whatever the text
            self._prefix = tokenizer.build_inputs_with_special_tokens([])

    def encode(self, text: str) -> list[int]:
        """Ids of plain text, no special tokens added."""
        if self._fast is not None:
            return self._fast(text)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """`tokenizer.encode(text)`: the text with the tokenizer's special tokens (bos, `[gMASK] sop`...)."""
        if self._fast is not None:
            return self._prefix + self.encode(text)
        return self.tokenizer.encode(text, add_special_tokens=True)

    def build_chat_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> ChatPrompt:
        raise NotImplementedError

    def build_messages_prompt(self, messages: Sequence[Mapping[str, Any]]) -> ChatPrompt:
        """The chat prompt of a dialogue of published messages (`{"role", "content", "metadata"?, "tools"?}`,
        tool calls and observations included), for the model to answer next."""
        raise ValueError(
            f"template {self.name!r} has no tool-call format (tools work with the chatglm3 and glm4 templates)"
        )

    def labelled_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> TrainSample:
        """`build_chat_prompt(query, history, system).input_ids`, labelled: the ids of every answer in
        `history` (and of the token that ends it, where the format has one in the prompt), -100 elsewhere."""
        raise NotImplementedError

    def build_train_sample(
        self,
        query: str,
        response: str,
        history: History | None = None,
        system: str | None = None,
        max_source_length: int | None = None,
        max_target_length: int | None = None,
    ) -> TrainSample:
        """Chat prompt ids + response ids + eos; labels -100 on the prompt."""
        prompt = self.build_chat_prompt(query, history, system).input_ids
        eos = self.tokenizer.eos_token_id
        return self.sample(prompt, self.encode(response), eos, max_source_length, max_target_length)

    def build_dialogue_sample(self, turns: History, system: str | None = None) -> TrainSample:
        """One sample for a whole dialogue (a list of (query, answer) turns, or user/assistant messages).

        The ids are `build_train_sample(last query, last answer, history=the earlier turns)`: the chat prompt
        of the last turn, then the last answer and its end token. The labels supervise the last answer as that
        sample does, and also every earlier answer where it sits in the prompt, with the token that ends it
        when the format writes one into the prompt (ChatGLM3: the next role token, as THUDM's ChatGLM3
        fine-tuning does; LLaMA-2: `</s>`; ChatML: `<|im_end|>`). Formats whose history has no end token
        (ChatGLM2, Alpaca, ChatGLM3 plain) supervise the earlier answers' text only: the separator after them
        is template text, not something the model says.
        """
        if self.dialogue_unsupported:
            raise ValueError(
                f"template {self.name!r} cannot build dialogue samples: {self.dialogue_unsupported}"
            )
        pairs = as_pairs(turns)
        if not pairs:
            raise ValueError("a dialogue needs at least one (query, answer) turn")
        *history, (query, response) = pairs
        prompt = self.labelled_prompt(query, history, system)
        sample = self.build_train_sample(query, response, history, system)
        n = len(prompt.input_ids)
        if sample.input_ids[:n] != prompt.input_ids:  # would be a bug in this module, not in the data
            raise RuntimeError(
                f"template {self.name!r}: the dialogue sample does not start with the chat prompt"
            )
        return TrainSample(sample.input_ids, prompt.labels + sample.labels[n:])

    def sample(
        self,
        prompt_ids: list[int],
        target_ids: list[int],
        eos_id: int | None,
        max_source_length: int | None = None,
        max_target_length: int | None = None,
    ) -> TrainSample:
        """prompt + target (+ eos), the loss only on target and eos. Too long parts lose their end (the
        prompt keeps its `protected_tail` tokens)."""
        if max_source_length is not None and len(prompt_ids) > max_source_length:
            tail = min(self.protected_tail, max_source_length)
            prompt_ids = prompt_ids[: max_source_length - tail] + prompt_ids[len(prompt_ids) - tail :]
        if max_target_length is not None:
            target_ids = target_ids[:max_target_length]
        target_ids = target_ids + ([eos_id] if eos_id is not None else [])
        return TrainSample(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids)

    def labelled_text(self, parts: Parts, special_tokens: bool) -> TrainSample:
        """The ids of `"".join(parts)` (with the tokenizer's special tokens when asked), labelled on the
        tokens that carry the parts flagged True.

        The text is encoded whole, exactly as the chat prompt is, so the answer tokens are found afterwards:
        the answer spans the tokens between the encodings of the text before it and of the text up to its end.
        A token that straddles a boundary (a merge across it) carries answer text and is supervised.
        """
        text = "".join(t for t, _ in parts)
        body = self.encode(text)
        ids = self.encode_with_special_tokens(text) if special_tokens else body
        head = self.special_head if special_tokens else 0
        if ids[head : head + len(body)] != body:
            raise RuntimeError(
                f"template {self.name!r}: cannot find the text's tokens between the special tokens of "
                f"{type(self.tokenizer).__name__}"
            )
        labels = [IGNORE_INDEX] * len(ids)
        end = 0
        for part, supervised in parts:
            start, end = end, end + len(part)
            if not (supervised and part):
                continue
            first = _common_prefix(self.encode(text[:start]), body) if start else 0
            upto = self.encode(text[:end])
            last = _common_prefix(upto, body)
            if last < len(upto):  # body[last] crosses the answer's end: it carries answer text too
                last += 1
            last = max(first, min(last, len(body)))
            labels[head + first : head + last] = body[first:last]
        return TrainSample(ids, labels)

    @property
    def stop_token_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []


class TextTemplate(ChatTemplate):
    """A format that is one text: `prompt_parts` gives it in pieces, answers of the history flagged."""

    special_tokens: ClassVar[bool] = True  # encode the prompt with the tokenizer's special tokens

    def prompt_parts(self, query: str, history: History | None = None, system: str | None = None) -> Parts:
        raise NotImplementedError

    def prompt_text(self, query: str, history: History | None = None, system: str | None = None) -> str:
        return "".join(t for t, _ in self.prompt_parts(query, history, system))

    def build_chat_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> ChatPrompt:
        text = self.prompt_text(query, history, system)
        ids = self.encode_with_special_tokens(text) if self.special_tokens else self.encode(text)
        return ChatPrompt(text, ids)

    def labelled_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> TrainSample:
        return self.labelled_text(self.prompt_parts(query, history, system), self.special_tokens)


# --- ChatGLM ------------------------------------------------------------------------------------------------


class ChatGLMTemplate(TextTemplate):
    """ChatGLM-6B: `[Round i]\\n问：...\\n答：...\\n` from round 0; a first question goes in bare.

    Samples are `prompt [gMASK] <sop> response <eop>`; <sop> is already supervised, so the prompt ends with
    the one protected token `[gMASK]`. No dialogue samples: see `dialogue_unsupported`.
    """

    name = "chatglm"
    protected_tail = 1
    dialogue_unsupported = (
        "ChatGLM-6B reads its prompt (everything before [gMASK] <sop>, earlier rounds included) "
        "bidirectionally, so the earlier answers in it cannot be next-token targets; use "
        "multi_turn='per_turn' (one sample per round with the earlier rounds as context, as the published "
        "ChatGLM-6B fine-tuning does), which supervises every answer"
    )

    def prompt_parts(self, query: str, history: History | None = None, system: str | None = None) -> Parts:
        query, pairs = system_in_first_query(query, history, system)
        if not pairs:
            return [(query, False)]  # text [gMASK] <sop>
        parts: Parts = []
        for i, (q, r) in enumerate(pairs):
            parts += [(f"[Round {i}]\n问：{q}\n答：", False), (r, True), ("\n", False)]
        return parts + [(f"[Round {len(pairs)}]\n问：{query}\n答：", False)]

    def build_train_sample(
        self,
        query: str,
        response: str,
        history: History | None = None,
        system: str | None = None,
        max_source_length: int | None = None,
        max_target_length: int | None = None,
    ) -> TrainSample:
        """Published ptuning/main.py: `prompt [gMASK] <sop> response <eop>`; the labels keep <sop> onwards.

        (Keeping <sop> is harmless: the model shifts labels, so position i predicts label i+1.)
        """
        a_ids = self.encode(self.prompt_text(query, history, system))
        b_ids = self.encode(response)
        if max_source_length is not None:
            a_ids = a_ids[: max_source_length - 1]
        if max_target_length is not None:
            b_ids = b_ids[: max_target_length - 2]
        input_ids = self.tokenizer.build_inputs_with_special_tokens(a_ids, b_ids)
        context_length = input_ids.index(self.tokenizer.bos_token_id)
        return TrainSample(input_ids, [IGNORE_INDEX] * context_length + input_ids[context_length:])


class ChatGLM2Template(TextTemplate):
    """ChatGLM2-6B: `[Round i]\\n\\n问：...\\n\\n答：...\\n\\n` from round 1, always wrapped; `[gMASK] sop` first."""

    name = "chatglm2"
    protected_head = 2

    def prompt_parts(self, query: str, history: History | None = None, system: str | None = None) -> Parts:
        query, pairs = system_in_first_query(query, history, system)
        parts: Parts = []
        for i, (q, r) in enumerate(pairs):
            parts += [(f"[Round {i + 1}]\n\n问：{q}\n\n答：", False), (r, True), ("\n\n", False)]
        return parts + [(f"[Round {len(pairs) + 1}]\n\n问：{query}\n\n答：", False)]


class ChatGLM3Template(ChatTemplate):
    """ChatGLM3-6B chat format: role tokens, each followed by a metadata line (`<|user|>\\n...<|assistant|>`).

    Chat prompts are the published `build_chat_input` (a `system` becomes a system message). Training
    samples are the chat prompt, then the metadata line `\\n`, the response and eos as targets, so that
    training matches what `chat()` shows the model. Dialogue samples supervise each earlier assistant message
    (metadata line and content) and the role token after it, as THUDM's ChatGLM3 multi-turn fine-tuning does.
    For the plain format of the reference fine-tuning data (no role tokens), use "chatglm3_plain".
    """

    name = "chatglm3"
    chat_format: ClassVar[bool] = True
    supports_tools = True
    protected_head = 2
    protected_tail = 1  # the final <|assistant|>
    label_newline: ClassVar[bool] = True  # the metadata line after <|assistant|> is learnt

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_format: bool | None = None) -> None:
        if chat_format is not None and chat_format != self.chat_format:
            other = "chatglm3" if chat_format else "chatglm3_plain"
            raise ValueError(
                f"template {self.name!r} has chat_format={self.chat_format}; use template {other!r}"
            )
        super().__init__(tokenizer)

    @staticmethod
    def messages(history: History | None, system: str | None = None) -> list[Mapping[str, Any]]:
        out: list[Mapping[str, Any]] = [{"role": "system", "content": system}] if system else []
        for item in history or []:
            if isinstance(item, Mapping):
                out.append(item)
            else:
                query, response = item
                out += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        return out

    def build_chat_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> ChatPrompt:
        # build_chat_ids: the ids of the published build_chat_input, without making a tensor batch of them
        return ChatPrompt(None, self.tokenizer.build_chat_ids(query, history=self.messages(history, system)))

    def labelled_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> TrainSample:
        ids = self.build_chat_prompt(query, history, system).input_ids
        roles = {
            self.tokenizer.get_command(f"<|{r}|>") for r in ("system", "user", "assistant", "observation")
        }
        assistant = self.tokenizer.get_command("<|assistant|>")
        labels = [IGNORE_INDEX] * len(ids)
        # Content is never encoded to a role token, so role tokens delimit the messages exactly.
        starts = [i for i, t in enumerate(ids) if t in roles]
        for start, end in zip(starts, starts[1:]):
            if ids[start] == assistant:  # metadata line + content, and the next role token that ends it
                labels[start + 1 : end + 1] = ids[start + 1 : end + 1]
        return TrainSample(ids, labels)

    def build_messages_prompt(self, messages: Sequence[Mapping[str, Any]]) -> ChatPrompt:
        return ChatPrompt(None, messages_prompt_ids(self.tokenizer, messages))

    def build_messages_sample(self, messages: Sequence[Mapping[str, Any]]) -> TrainSample:
        """A tool-call dialogue (see glmtune/tokenizers/tool_prompts.py), every assistant message learnt."""
        return TrainSample(*build_messages_sample(self.tokenizer, messages, label_first=self.label_newline))

    def build_train_sample(
        self,
        query: str,
        response: str,
        history: History | None = None,
        system: str | None = None,
        max_source_length: int | None = None,
        max_target_length: int | None = None,
    ) -> TrainSample:
        prompt = self.build_chat_prompt(query, history, system).input_ids
        target = self.encode("\n") + self.encode(response)  # metadata line (empty) + content
        return self.sample(prompt, target, self.tokenizer.eos_token_id, max_source_length, max_target_length)

    @property
    def stop_token_ids(self) -> list[int]:
        ids = [self.tokenizer.eos_token_id] + self.tokenizer.convert_tokens_to_ids(
            ["<|user|>", "<|observation|>"]
        )
        return [i for i in ids if i is not None]


class ChatGLM3PlainTemplate(ChatGLM3Template):
    """ChatGLM3-6B, plain format of the reference fine-tuning data: `[gMASK] sop` + query + response + eos.

    History turns, if any, come first as their query and response ids in order; `system` goes before the
    first query. This is the `train_sample` of tokenizer_golden.json. Its chat prompt is the same plain
    prefix, so a model tuned with it should be prompted with this template too: the published `chat()` uses
    role tokens (template "chatglm3").
    """

    name = "chatglm3_plain"
    chat_format = False
    protected_tail = 0
    supports_tools = False
    build_messages_prompt = ChatTemplate.build_messages_prompt

    def labelled_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> TrainSample:
        query, pairs = system_in_first_query(query, history, system)
        ids: list[int] = []
        labels: list[int] = []
        for q, r in pairs:
            q_ids, r_ids = self.encode(q), self.encode(r)
            ids += q_ids + r_ids
            labels += [IGNORE_INDEX] * len(q_ids) + r_ids
        q_ids = self.encode(query)
        full = self.tokenizer.build_inputs_with_special_tokens(ids + q_ids)  # [gMASK] sop ...
        head = len(full) - len(ids) - len(q_ids)
        return TrainSample(full, [IGNORE_INDEX] * head + labels + [IGNORE_INDEX] * len(q_ids))

    def build_chat_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> ChatPrompt:
        return ChatPrompt(None, self.labelled_prompt(query, history, system).input_ids)

    # The response follows the query directly (no metadata line as after a role token): the base class's.
    build_train_sample = ChatTemplate.build_train_sample


class GLM4Template(ChatGLM3Template):
    """GLM-4-9B-Chat: the published `chat_template` (ChatGLM3's messages after `[gMASK]<sop>`, each message one
    text after its role token). Samples as THUDM's GLM-4 fine-tuning demo builds them: `\\n` + the answer
    after `<|assistant|>`, then `<|user|>` to end it; with its `combine: true` the `\\n` is not supervised,
    with `combine: false` ("glm4_per_message") it is. Dialogue samples label every earlier answer the same
    way."""

    name = "glm4"
    label_newline = False  # True is the demo's `combine: false`

    def labelled_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> TrainSample:
        ids, labels = super().labelled_prompt(query, history, system)
        if not self.label_newline:  # the first token of each answer's text, its `\n`, is left out
            assistant = self.tokenizer.get_command("<|assistant|>")
            labels = [IGNORE_INDEX if i and ids[i - 1] == assistant else x for i, x in enumerate(labels)]
        return TrainSample(ids, labels)

    def build_train_sample(
        self,
        query: str,
        response: str,
        history: History | None = None,
        system: str | None = None,
        max_source_length: int | None = None,
        max_target_length: int | None = None,
    ) -> TrainSample:
        prompt = self.build_chat_prompt(query, history, system).input_ids
        target = self.encode("\n" + response)  # encoded as one text, as the chat template writes it
        end = self.tokenizer.get_command("<|user|>")
        ids, labels = self.sample(prompt, target, end, max_source_length, max_target_length)
        kept = len(target) if max_target_length is None else min(len(target), max_target_length)
        if kept and not self.label_newline:
            labels[len(ids) - kept - 1] = IGNORE_INDEX  # the `\n` after <|assistant|>
        return TrainSample(ids, labels)


class GLM4PerMessageTemplate(GLM4Template):
    """GLM-4-9B-Chat samples as the fine-tuning demo's `combine: false` labels them (the `\\n` too)."""

    name = "glm4_per_message"
    label_newline = True
