"""Chat templates for models outside the ChatGLM family, on any transformers tokenizer: LLaMA-2's `[INST]`,
ChatML (Qwen, Yi, ...) and Alpaca's instruction format. See prompts.py for what a template does."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from glmtune.data.samples import IGNORE_INDEX
from glmtune.tokenizers.prompts import (
    ChatPrompt,
    ChatTemplate,
    History,
    Parts,
    TextTemplate,
    TrainSample,
    as_pairs,
    special_token_counts,
)


class Llama2Template(ChatTemplate):
    """LLaMA-2 chat (Meta's `chat_completion`): `<s>[INST] q [/INST] a </s>` per turn, `<<SYS>>` in the first.

    Each turn is encoded on its own, between bos and eos, as Meta's code does.
    """

    name = "llama2"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> None:
        super().__init__(tokenizer)
        self.system = system
        self.protected_head = 1 if tokenizer.bos_token_id is not None else 0

    def turns(self, query: str, history: History | None, system: str | None) -> list[tuple[str, Parts]]:
        """Each turn as (text, parts): `[INST] q [/INST] a ` (answer flagged); the last `[INST] q [/INST]`."""
        system = system or self.system
        out = []
        pairs: list[tuple[str, str | None]] = [*as_pairs(history), (query, None)]
        for i, (q, a) in enumerate(pairs):
            if i == 0 and system:
                q = f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}"
            if a is None:
                parts: Parts = [(f"[INST] {q.strip()} [/INST]", False)]
            else:
                parts = [(f"[INST] {q.strip()} [/INST] ", False), (a.strip(), True), (" ", False)]
            out.append(("".join(t for t, _ in parts), parts))
        return out

    def build(
        self, query: str, history: History | None, system: str | None, labelled: bool
    ) -> tuple[str, TrainSample]:
        bos, eos = self.tokenizer.bos_token, self.tokenizer.eos_token
        bos_ids = [self.tokenizer.bos_token_id] if bos is not None else []
        eos_ids = [self.tokenizer.eos_token_id] if eos is not None else []
        text, ids, labels = "", [], []
        turns = self.turns(query, history, system)
        for i, (segment, parts) in enumerate(turns):
            last = i == len(turns) - 1
            seg = self.labelled_text(parts, False) if labelled and not last else None
            seg_ids = seg.input_ids if seg else self.encode(segment)
            end_ids = [] if last else eos_ids
            text += (bos or "") + segment + ("" if last else eos or "")
            ids += bos_ids + seg_ids + end_ids
            if labelled:
                seg_labels = seg.labels if seg else [IGNORE_INDEX] * len(seg_ids)
                labels += [IGNORE_INDEX] * len(bos_ids) + seg_labels + end_ids  # </s> ends the answer
        return text, TrainSample(ids, labels)

    def build_chat_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> ChatPrompt:
        text, sample = self.build(query, history, system, labelled=False)
        return ChatPrompt(text, sample.input_ids)

    def labelled_prompt(
        self, query: str, history: History | None = None, system: str | None = None
    ) -> TrainSample:
        return self.build(query, history, system, labelled=True)[1]

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


class ChatMLTemplate(TextTemplate):
    """ChatML (Qwen): `<|im_start|>role\\ncontent<|im_end|>\\n` per message, then `<|im_start|>assistant\\n`.

    The answer ends with `<|im_end|>`; when the tokenizer has no such token (it would be plain text), eos is
    appended to the target too so the model learns to stop.
    """

    name = "chatml"
    special_tokens = False

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> None:
        super().__init__(tokenizer)
        self.system = system

    @property
    def im_end_id(self) -> int | None:
        """Id of `<|im_end|>` when the tokenizer has it as one token."""
        tid = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        return None if tid is None or tid == self.tokenizer.unk_token_id else tid

    def prompt_parts(self, query: str, history: History | None = None, system: str | None = None) -> Parts:
        system = system or self.system
        parts: Parts = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)] if system else []
        for q, a in as_pairs(history):
            parts += [
                (f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", False),
                (f"{a}<|im_end|>", True),
                ("\n", False),
            ]
        return parts + [(f"<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n", False)]

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


class AlpacaTemplate(TextTemplate):
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
        if self.protected_tail:
            self.dialogue_unsupported = (
                f"{type(tokenizer).__name__} puts special tokens after the prompt (GLM's [gMASK] <sop>): the "
                "model reads the prompt, earlier answers included, bidirectionally; use multi_turn='per_turn'"
            )

    def prompt_parts(self, query: str, history: History | None = None, system: str | None = None) -> Parts:
        parts: Parts = [(f"{system}\n\n" if system else self.header, False)]
        for q, a in as_pairs(history):
            parts += [(f"### Instruction:\n{q}\n\n### Response:\n", False), (a, True), ("\n\n", False)]
        return parts + [(f"### Instruction:\n{query}\n\n### Response:\n", False)]
