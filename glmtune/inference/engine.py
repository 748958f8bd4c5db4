"""Chat with a model: the family's prompt template, transformers' generate(), stop strings, streaming.

Every front end (terminal chat, batch prediction, HTTP API, web page, Python API) goes through `ChatEngine`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from glmtune.config import GenerationArgs

History = list[tuple[str, str]]


def cut_at_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[str, bool]:
    """Text up to the first stop string (excluded), and whether one was found, looking from `start` on (a
    stream looks only where the newest text could complete one, so each token costs O(new text))."""
    cut = min((i for i in (text.find(s, start) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (not to be shown yet).

    A stream shows the answer so far; text that may turn out to begin a stop string waits until the next
    tokens settle it, so a stop string never appears, streamed or not.
    """
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[len(text) - n :]):
                longest = n
                break
    return longest


class Completion(NamedTuple):
    """One answer and what an API reports about it."""

    text: str
    prompt_tokens: int
    completion_tokens: int  # tokens generated before the stop token (a stop string may cut the text earlier)
    finish_reason: Literal["stop", "length"]  # "length": max_new_tokens ran out first


@dataclass
class Row:
    """One prompt of a batched generate(), and what its caller wants of it."""

    prompt: list[int]
    budget: int | None = None  # max_new_tokens for this row; None: the call's
    stops: list[str] | None = None  # stop strings; None: the call's (or the generation config's)
    on_text: Callable[[str], None] | None = None  # streaming: the answer so far, after each token
    on_done: Callable[[Completion], None] | None = None  # the answer, as soon as the row is finished
    cancelled: Callable[[], bool] | None = None  # True once nobody waits for the answer: the row stops


@dataclass
class ChatEngine:
    model: torch.nn.Module
    tokenizer: object
    template: object
    generation: GenerationArgs = field(default_factory=GenerationArgs)
    # One generate() at a time: servers call the engine from several threads, and one model's forward is not
    # safe to run concurrently (PEFT's active-adapter state, shared caches); it would only share the CPU anyway.
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """Longest sequence (prompt + answer) the model's positions cover, from its config; None if unknown."""
        config = getattr(self.model, "config", None)
        for key in ("seq_length", "max_sequence_length", "max_position_embeddings"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _generate_kwargs(self, overrides: dict) -> dict:
        g = {**self.generation.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
        kwargs = dict(
            max_new_tokens=g["max_new_tokens"],
            do_sample=g["do_sample"],
            num_beams=g["num_beams"],
            repetition_penalty=g["repetition_penalty"],
            eos_token_id=self.template.stop_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if g["do_sample"]:
            kwargs.update(temperature=g["temperature"], top_p=g["top_p"], top_k=g["top_k"])
        return kwargs

    def prompt_ids(self, query: str, history: History | None = None, system: str | None = None) -> list[int]:
        return list(self.template.build_chat_prompt(query, history or [], system).input_ids)

    def _batch(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left-pad prompts so every row's answer starts at the same column."""
        longest = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, longest - len(p) :] = torch.tensor(p)
            mask[row, longest - len(p) :] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _until_stop_token(self, ids: Sequence[int]) -> tuple[list[int], bool]:
        """The generated ids before the first stop token, and whether there was one."""
        stops = set(self.template.stop_token_ids)
        kept = []
        for i in ids:
            if i in stops:
                return kept, True
            kept.append(int(i))
        return kept, False

    def messages_prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """The prompt of a dialogue of published messages (tools, tool calls and observations included)."""
        return list(self.template.build_messages_prompt(messages).input_ids)

    def batch_complete(
        self,
        queries: list[str],
        histories: list[History] | None = None,
        systems: list[str | None] | None = None,
        *,
        row_budgets: list[int] | None = None,
        row_stops: list[list[str] | None] | None = None,
        **overrides,
    ) -> list[Completion]:
        """One generate() for all queries (see `complete_prompts`)."""
        histories = histories or [[] for _ in queries]
        systems = systems or [None for _ in queries]
        prompts = [self.prompt_ids(q, h, s) for q, h, s in zip(queries, histories, systems, strict=True)]
        return self.complete_prompts(prompts, row_budgets=row_budgets, row_stops=row_stops, **overrides)

    def _row_state(
        self, prompt: list[int], new: Sequence[int], budget: int, stops: Sequence[str]
    ) -> tuple[Completion, bool, str]:
        """One row from its generated ids so far: its answer, whether it is finished (a stop token, a stop
        string, or its budget spent), and the text to show while it streams."""
        kept, ended = self._until_stop_token(new[:budget])
        text, cut = cut_at_stop(self.tokenizer.decode(kept, skip_special_tokens=True), stops)
        # A row without a stop token ran to max_new_tokens (rows that ended are padded after it).
        completion = Completion(text.strip(), len(prompt), len(kept), "stop" if ended or cut else "length")
        return completion, ended or cut or len(new) >= budget, text

    def complete_prompts(
        self,
        prompts: list[list[int]],
        *,
        row_budgets: list[int] | None = None,
        row_stops: list[list[str] | None] | None = None,
        **overrides,
    ) -> list[Completion]:
        """One generate() for all prompts (ids), each with its own max_new_tokens and stop strings if given
        (see `generate_rows`)."""
        rows = [
            Row(p, row_budgets[i] if row_budgets else None, row_stops[i] if row_stops else None)
            for i, p in enumerate(prompts)
        ]
        return self.generate_rows(rows, **overrides)

    @torch.inference_mode()
    def generate_rows(self, rows: Sequence[Row], **overrides) -> list[Completion]:
        """One generate() for all rows (a server batching different requests). Each row is cut to its own
        budget and stop strings, which for greedy decoding is exactly its solo answer; it hears of its text
        after every token if it streams, and of its answer as soon as it is finished, not when the whole
        batch ends. Generation ends when every row is finished (or cancelled)."""
        batch = self._batch([row.prompt for row in rows])
        if all(row.budget is not None for row in rows):
            overrides = {**overrides, "max_new_tokens": max(row.budget for row in rows)}
        kwargs = self._generate_kwargs(overrides)
        budgets = [row.budget or kwargs["max_new_tokens"] for row in rows]
        stops = [row.stops or overrides.get("stop") or self.generation.stop for row in rows]
        width = batch["input_ids"].shape[1]
        stop_ids = set(self.template.stop_token_ids)
        done: dict[int, Completion] = {}

        def finish(i: int, completion: Completion) -> None:
            done[i] = completion
            if rows[i].on_done is not None:
                rows[i].on_done(completion)

        def finished_rows(input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
            length = input_ids.shape[1] - width
            last = input_ids[:, -1].tolist()
            for i, row in enumerate(rows):
                if i in done:
                    continue
                cancelled = row.cancelled is not None and row.cancelled()
                # Only a row that streams or has stop strings needs its text decoded at every step.
                if cancelled or last[i] in stop_ids or length >= budgets[i] or stops[i] or row.on_text:
                    completion, finished, shown = self._row_state(
                        row.prompt, input_ids[i, width:].tolist(), budgets[i], stops[i]
                    )
                    if row.on_text is not None and not cancelled:
                        # U+FFFD at the end: the first bytes of a character whose last token is still to
                        # come; until the row is finished it waits for them.
                        row.on_text(shown if finished else shown.rstrip("\ufffd"))
                    if finished or cancelled:
                        finish(i, completion)
            flags = [i in done for i in range(len(rows))]
            return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

        from transformers import StoppingCriteriaList

        criteria = [finished_rows]
        if kwargs["num_beams"] > 1:
            # Beam search keeps several hypotheses per row and picks one at the end: there is no row's text
            # to follow token by token, so rows are cut only once generate() returns.
            if any(row.on_text is not None for row in rows):
                raise ValueError(
                    "streaming needs generation.num_beams 1 (beam search picks its answer at the end)"
                )
            criteria = []
        with self._lock:
            out = self.model.generate(**batch, **kwargs, stopping_criteria=StoppingCriteriaList(criteria))
        new = out[:, width:].tolist()
        for i, row in enumerate(rows):
            if i not in done:  # generate() ended first (max_new_tokens)
                completion, _, shown = self._row_state(row.prompt, new[i], budgets[i], stops[i])
                if row.on_text is not None:
                    row.on_text(shown)
                finish(i, completion)
        return [done[i] for i in range(len(rows))]

    def batch_chat(
        self, queries: list[str], histories: list[History] | None = None, **overrides
    ) -> list[str]:
        return [c.text for c in self.batch_complete(queries, histories, **overrides)]

    def complete(
        self, query: str, history: History | None = None, system: str | None = None, **overrides
    ) -> Completion:
        return self.batch_complete([query], [history or []], [system], **overrides)[0]

    def chat(
        self, query: str, history: History | None = None, system: str | None = None, **overrides
    ) -> tuple[str, History]:
        response = self.complete(query, history, system, **overrides).text
        return response, [*(history or []), (query, response)]

    def stream_chat(
        self, query: str, history: History | None = None, system: str | None = None, **overrides
    ) -> Generator[str, None, Completion]:
        """Yield the answer so far, growing, as tokens arrive (what a terminal or SSE client shows).

        The generator's return value (`StopIteration.value`) is the finished `Completion`. Closing the
        generator early stops generate() at the next token.
        """
        return self.stream_prompt(self.prompt_ids(query, history, system), **overrides)

    def stream_prompt(self, prompt: list[int], **overrides) -> Generator[str, None, Completion]:
        """`stream_chat` for a prompt given as ids: its row of `generate_rows`, run in a thread."""
        updates: queue.SimpleQueue = queue.SimpleQueue()
        gone = threading.Event()
        row = Row(prompt, on_text=updates.put, on_done=updates.put, cancelled=gone.is_set)

        def run() -> None:
            try:
                self.generate_rows([row], **overrides)
            except BaseException as err:  # re-raised in the consumer's thread below
                updates.put(err)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        shown = None
        try:
            while True:
                update = updates.get()
                if isinstance(update, BaseException):
                    raise update
                if isinstance(update, Completion):
                    return update
                if update != shown:
                    shown = update
                    yield shown
        finally:
            gone.set()  # the consumer closed us: generate() need not go on
            thread.join()
