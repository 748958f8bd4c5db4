"""Chat with a model: the family's prompt template, transformers' generate(), stop strings, streaming.

Every front end (terminal chat, batch prediction, HTTP API, web page, Python API) goes through `ChatEngine`.
"""

from __future__ import annotations

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


class _Cancelled:
    """A stopping criterion: ends generate() once the consumer of a stream has gone (or hit a stop string)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


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

    def _row_completion(
        self, prompt: list[int], new: Sequence[int], budget: int | None, stops: Sequence[str]
    ) -> tuple[Completion, bool]:
        """One row's answer from its generated ids so far, and whether it is finished (a stop token, a stop
        string, or its budget spent)."""
        kept, ended = self._until_stop_token(new if budget is None else new[:budget])
        text, cut = cut_at_stop(self.tokenizer.decode(kept, skip_special_tokens=True), stops)
        spent = budget is not None and len(new) >= budget
        # A row without a stop token ran to max_new_tokens (rows that ended are padded after it).
        completion = Completion(text.strip(), len(prompt), len(kept), "stop" if ended or cut else "length")
        return completion, ended or cut or spent

    @torch.inference_mode()
    def complete_prompts(
        self,
        prompts: list[list[int]],
        *,
        row_budgets: list[int] | None = None,
        row_stops: list[list[str] | None] | None = None,
        on_row_done: Callable[[int, Completion], None] | None = None,
        **overrides,
    ) -> list[Completion]:
        """One generate() for all prompts (ids). `row_budgets` and `row_stops` give each row its own
        max_new_tokens and stop strings (a server batching different requests); each row is cut to its own,
        which for greedy decoding is exactly its solo answer. Generation ends when every row is finished, and
        `on_row_done(row, completion)` hears of each row as soon as it is (a server answers it then, not when
        the whole batch ends)."""
        batch = self._batch(prompts)
        if row_budgets is not None:
            overrides = {**overrides, "max_new_tokens": max(row_budgets)}
        kwargs = self._generate_kwargs(overrides)
        stops = overrides.get("stop") or self.generation.stop
        budgets = row_budgets or [kwargs["max_new_tokens"]] * len(prompts)
        rows_stops = [(row_stops[i] if row_stops else None) or stops for i in range(len(prompts))]
        width = batch["input_ids"].shape[1]
        done: dict[int, Completion] = {}

        stop_ids = set(self.template.stop_token_ids)

        def finished_rows(input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
            length = input_ids.shape[1] - width
            last = input_ids[:, -1].tolist()
            for i in range(len(prompts)):
                # Only a row with stop strings needs its text decoded at every step.
                if i not in done and (last[i] in stop_ids or length >= budgets[i] or rows_stops[i]):
                    completion, finished = self._row_completion(
                        prompts[i], input_ids[i, width:].tolist(), budgets[i], rows_stops[i]
                    )
                    if finished:
                        done[i] = completion
                        if on_row_done is not None:
                            on_row_done(i, completion)
            flags = [i in done for i in range(len(prompts))]
            return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

        from transformers import StoppingCriteriaList

        with self._lock:
            out = self.model.generate(
                **batch, **kwargs, stopping_criteria=StoppingCriteriaList([finished_rows])
            )
        new = out[:, width:].tolist()
        completions = []
        for i, prompt in enumerate(prompts):
            if i not in done:  # generate() ended first (max_new_tokens)
                done[i] = self._row_completion(prompt, new[i], budgets[i], rows_stops[i])[0]
                if on_row_done is not None:
                    on_row_done(i, done[i])
            completions.append(done[i])
        return completions

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
        """`stream_chat` for a prompt given as ids."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        batch = self._batch([prompt])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        kwargs = {
            **batch,
            **self._generate_kwargs(overrides),
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_Cancelled(cancel)]),
        }
        outputs: list[torch.Tensor] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if cancel.is_set():  # the consumer left while another request held the model
                        streamer.end()
                        return
                    outputs.append(self.model.generate(**kwargs))
            except BaseException as err:  # re-raised in the caller's thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        stops = overrides.get("stop") or self.generation.stop
        longest_stop = max((len(s) for s in stops), default=0)
        text, shown, stopped = "", "", False
        try:
            for piece in streamer:
                unsettled = max(0, len(text) - longest_stop + 1)  # earlier text held no stop string
                text += piece
                shown, stopped = cut_at_stop(text, stops, unsettled)
                yield shown
                if stopped:
                    break
        finally:
            cancel.set()  # a stop string was hit or the consumer closed us: generate() need not go on
            thread.join()
        if errors:
            raise errors[0]
        kept, ended = self._until_stop_token(outputs[0][0, batch["input_ids"].shape[1] :].tolist())
        return Completion(shown.strip(), len(prompt), len(kept), "stop" if ended or stopped else "length")
