"""Batched generation for the API: the answers requested while the model is busy go into one generate().

One generate() of 16 rows costs little more than one of a single row on the same hardware, so gathering
the requests that queue up multiplies throughput. Rows are left-padded; each keeps its own max_tokens and
stop strings and is cut to its own, so a greedy answer is exactly its solo answer. A request is answered as
soon as its row is finished (its stop token, a stop string, or its budget), not when the whole batch ends;
the batch ends when every row is finished. Requests whose sampling settings differ cannot share a generate() call, so each
batch takes the oldest request and those waiting with the same settings.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from glmtune.inference.engine import ChatEngine, Completion


@dataclass
class Pending:
    """One request waiting for its answer."""

    prompt: list[int]  # the chat prompt's ids
    budget: int
    stop: list[str] | None
    sampling: dict[str, Any]
    answer: asyncio.Future = field(repr=False)

    @property
    def settings(self) -> tuple:
        return tuple(sorted(self.sampling.items()))


class Batcher:
    """Answers non-streamed requests in batches of up to `max_batch_size`; one batch runs at a time.

    Lives on the event loop: requests append to `pending` and one drain task runs the batches in a worker
    thread, gathering whatever arrived meanwhile into the next one.
    """

    def __init__(self, engine: ChatEngine, max_batch_size: int) -> None:
        if max_batch_size < 1:
            raise ValueError(f"a batch holds at least one request (got {max_batch_size})")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.pending: list[Pending] = []
        self.drain_task: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # what ran, for logs and tests

    async def complete(self, prompt: list[int], overrides: dict[str, Any]) -> Completion:
        """The answer to one prompt, as `ChatEngine.complete_prompts([prompt], **overrides)` gives it."""
        settings = dict(overrides)
        budget = settings.pop("max_new_tokens")
        stop = settings.pop("stop", None)
        item = Pending(prompt, budget, stop, settings, asyncio.get_running_loop().create_future())
        self.pending.append(item)
        if self.drain_task is None or self.drain_task.done():
            self.drain_task = asyncio.create_task(self._drain())
        return await item.answer

    def _take(self) -> list[Pending]:
        """The oldest live request and up to max_batch_size - 1 more waiting with the same sampling settings."""
        self.pending = [p for p in self.pending if not p.answer.done()]  # clients that left
        if not self.pending:
            return []
        settings = self.pending[0].settings
        batch = [p for p in self.pending if p.settings == settings][: self.max_batch_size]
        taken = {id(p) for p in batch}
        self.pending = [p for p in self.pending if id(p) not in taken]
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while batch := self._take():
            self.batch_sizes.append(len(batch))
            try:
                await run_in_threadpool(self._generate, batch, loop)
            except Exception as err:  # every request of the batch gets the failure (a 500, logged there)
                for item in batch:
                    _settle(item.answer, error=err)

    def _generate(self, batch: list[Pending], loop: asyncio.AbstractEventLoop) -> None:
        """Runs in a worker thread; each request is answered on the loop as soon as its row is finished."""

        def answer(row: int, completion: Completion) -> None:
            loop.call_soon_threadsafe(_settle, batch[row].answer, completion)

        self.engine.complete_prompts(
            [p.prompt for p in batch],
            row_budgets=[p.budget for p in batch],
            row_stops=[p.stop for p in batch],
            on_row_done=answer,
            **batch[0].sampling,
        )


def _settle(
    answer: asyncio.Future, completion: Completion | None = None, error: Exception | None = None
) -> None:
    """Give a waiting request its answer or error, unless its client has gone (or it has one already)."""
    if answer.done():
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(completion)
