"""Chat prompts and supervised training samples, one template per chat format.

A template wraps a tokenizer and knows:

- `build_chat_prompt(query, history, system)`: what the model sees before it answers, as the published `chat()`
  builds it (`ChatPrompt.text`, None where the format only exists as ids, and `ChatPrompt.input_ids`);
- `build_train_sample(query, response, history, system)`: `(input_ids, labels)` with -100 on the prompt, as the
  published fine-tuning scripts build them;
- `stop_token_ids`: the ids that end an answer;
- `protected_head` / `protected_tail`: how many prompt tokens at the start / end are structural (`[gMASK] sop`,
  bos, ...) and must survive truncation.

ChatGLM templates ("chatglm", "chatglm2", "chatglm3") reproduce THUDM's code token for token; "llama2", "chatml"
and "alpaca" work with any transformers tokenizer. `history` is a list of (query, response) pairs or of
`{"role", "content"}` messages. Formats without a system slot (ChatGLM-6B, ChatGLM2) put `system` before the
first query, on its own line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

History = Sequence[Sequence[str] | Mapping[str, Any]]


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


class ChatTemplate:
    """A chat format bound to a tokenizer. Subclasses define `build_chat_prompt` and, where needed, the rest."""

    name: ClassVar[str]
    protected_head: int = 0
    protected_tail: int = 0

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        """Ids of plain text, no special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def build_chat_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> ChatPrompt:
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

    @property
    def stop_token_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []


# --- ChatGLM ------------------------------------------------------------------------------------------------


class ChatGLMTemplate(ChatTemplate):
    """ChatGLM-6B: `[Round i]\\n问：...\\n答：...\\n` from round 0; a first question goes in bare.

    Samples are `prompt [gMASK] <sop> response <eop>`; <sop> is already supervised, so the prompt ends with
    the one protected token `[gMASK]`.
    """

    name = "chatglm"
    protected_tail = 1

    def prompt_text(self, query: str, history: History | None = None, system: str | None = None) -> str:
        query, pairs = system_in_first_query(query, history, system)
        if not pairs:
            return query
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(pairs))
        return prompt + f"[Round {len(pairs)}]\n问：{query}\n答："

    def build_chat_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> ChatPrompt:
        text = self.prompt_text(query, history, system)
        return ChatPrompt(text, self.tokenizer.encode(text))  # text [gMASK] <sop>

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


class ChatGLM2Template(ChatTemplate):
    """ChatGLM2-6B: `[Round i]\\n\\n问：...\\n\\n答：...\\n\\n` from round 1, always wrapped; `[gMASK] sop` first."""

    name = "chatglm2"
    protected_head = 2

    def prompt_text(self, query: str, history: History | None = None, system: str | None = None) -> str:
        query, pairs = system_in_first_query(query, history, system)
        prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(pairs))
        return prompt + f"[Round {len(pairs) + 1}]\n\n问：{query}\n\n答："

    def build_chat_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> ChatPrompt:
        text = self.prompt_text(query, history, system)
        return ChatPrompt(text, self.tokenizer.encode(text))  # [gMASK] sop text


class ChatGLM3Template(ChatTemplate):
    """ChatGLM3-6B: role tokens, each followed by a metadata line (`<|user|>\\n...<|assistant|>`).

    Chat prompts are the published `build_chat_input` (a `system` becomes a system message). Training samples,
    by default, are the plain format of the reference data: `[gMASK] sop` + query ids + response ids + eos
    (history turns, if any, as their query and response ids in order; `system` before the first query).
    `chat_format=True` trains in the chat format instead: the chat prompt, then the metadata line `\\n`, the
    response and eos as targets, so that training matches `build_chat_prompt`.
    """

    name = "chatglm3"
    protected_head = 2

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_format: bool = False) -> None:
        super().__init__(tokenizer)
        self.chat_format = chat_format
        self.protected_tail = 1 if chat_format else 0  # the final <|assistant|>

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
        batch = self.tokenizer.build_chat_input(query, history=self.messages(history, system))
        return ChatPrompt(None, [int(i) for i in batch["input_ids"][0]])

    def build_train_sample(
        self,
        query: str,
        response: str,
        history: History | None = None,
        system: str | None = None,
        max_source_length: int | None = None,
        max_target_length: int | None = None,
    ) -> TrainSample:
        eos = self.tokenizer.eos_token_id
        if self.chat_format:
            prompt = self.build_chat_prompt(query, history, system).input_ids
            target = self.encode("\n") + self.encode(response)  # metadata line (empty) + content
            return self.sample(prompt, target, eos, max_source_length, max_target_length)
        query, pairs = system_in_first_query(query, history, system)
        prompt = [i for q, r in pairs for i in self.encode(q) + self.encode(r)] + self.encode(query)
        prompt = self.tokenizer.build_inputs_with_special_tokens(prompt)  # [gMASK] sop ...
        return self.sample(prompt, self.encode(response), eos, max_source_length, max_target_length)

    @property
    def stop_token_ids(self) -> list[int]:
        ids = [self.tokenizer.eos_token_id] + self.tokenizer.convert_tokens_to_ids(
            ["<|user|>", "<|observation|>"]
        )
        return [i for i in ids if i is not None]


# --- other models --------------------------------------------------------------------------------------------


class Llama2Template(ChatTemplate):
    """LLaMA-2 chat (Meta's `chat_completion`): `<s>[INST] q [/INST] a </s>` per turn, `<<SYS>>` in the first."""

    name = "llama2"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> None:
        super().__init__(tokenizer)
        self.system = system
        self.protected_head = 1 if tokenizer.bos_token_id is not None else 0

    def build_chat_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> ChatPrompt:
        system = system or self.system
        bos, eos = self.tokenizer.bos_token, self.tokenizer.eos_token
        bos_ids = [self.tokenizer.bos_token_id] if bos is not None else []
        eos_ids = [self.tokenizer.eos_token_id] if eos is not None else []
        text, ids = "", []
        turns: list[tuple[str, str | None]] = [*as_pairs(history), (query, None)]
        for i, (q, a) in enumerate(turns):
            if i == 0 and system:
                q = f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}"
            if a is None:
                segment = f"[INST] {q.strip()} [/INST]"
                text += (bos or "") + segment
                ids += bos_ids + self.encode(segment)
            else:
                segment = f"[INST] {q.strip()} [/INST] {a.strip()} "
                text += (bos or "") + segment + (eos or "")
                ids += bos_ids + self.encode(segment) + eos_ids
        return ChatPrompt(text, ids)

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
        target = self.encode(response.strip())
        return self.sample(prompt, target, self.tokenizer.eos_token_id, max_source_length, max_target_length)


class ChatMLTemplate(ChatTemplate):
    """ChatML (Qwen): `<|im_start|>role\\ncontent<|im_end|>\\n` per message, then `<|im_start|>assistant\\n`.

    The answer ends with `<|im_end|>`; when the tokenizer has no such token (it would be plain text), eos is
    appended to the target too so the model learns to stop.
    """

    name = "chatml"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> None:
        super().__init__(tokenizer)
        self.system = system

    @property
    def im_end_id(self) -> int | None:
        """Id of `<|im_end|>` when the tokenizer has it as one token."""
        tid = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        return None if tid is None or tid == self.tokenizer.unk_token_id else tid

    def build_chat_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> ChatPrompt:
        system = system or self.system
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        for q, a in as_pairs(history):
            text += f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
        text += f"<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
        return ChatPrompt(text, self.encode(text))

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
        eos = self.tokenizer.eos_token_id if self.im_end_id is None else None
        return self.sample(
            prompt, self.encode(response + "<|im_end|>"), eos, max_source_length, max_target_length
        )

    @property
    def stop_token_ids(self) -> list[int]:
        ids = [self.im_end_id, self.tokenizer.eos_token_id]
        return list(dict.fromkeys(i for i in ids if i is not None))


class AlpacaTemplate(ChatTemplate):
    """Stanford Alpaca: an instruction header (or `system`), `### Instruction:` / `### Response:` blocks.

    The prompt is encoded with the tokenizer's own special tokens (LLaMA's bos, ChatGLM's `[gMASK]`...).
    """

    name = "alpaca"
    header = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
    )

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer)
        self.protected_head, self.protected_tail = special_token_counts(tokenizer)

    def prompt_text(self, query: str, history: History | None = None, system: str | None = None) -> str:
        text = f"{system}\n\n" if system else self.header
        for q, a in as_pairs(history):
            text += f"### Instruction:\n{q}\n\n### Response:\n{a}\n\n"
        return text + f"### Instruction:\n{query}\n\n### Response:\n"

    def build_chat_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> ChatPrompt:
        text = self.prompt_text(query, history, system)
        return ChatPrompt(text, self.tokenizer.encode(text, add_special_tokens=True))


TEMPLATES: dict[str, type[ChatTemplate]] = {
    cls.name: cls
    for cls in (
        ChatGLMTemplate,
        ChatGLM2Template,
        ChatGLM3Template,
        Llama2Template,
        ChatMLTemplate,
        AlpacaTemplate,
    )
}


def get_template(name: str, tokenizer: PreTrainedTokenizerBase, **options: Any) -> ChatTemplate:
    """The template `name` ("chatglm", "chatglm2", "chatglm3", "llama2", "chatml", "alpaca") bound to `tokenizer`.

    `options` go to the template: `system` (a default system prompt) for llama2/chatml, `chat_format` for
    chatglm3.
    """
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name](tokenizer, **options)
