"""Batched generation for the API: the answers requested while the model is busy go into one generate().

One generate() of 16 rows costs little more than one of a single row on the same hardware, so gathering
the requests that queue up multiplies throughput. Rows are left-padded; each keeps its own max_tokens and
stop strings and is cut to its own, so a greedy answer is exactly its solo answer. Streamed and whole
answers share batches: a stream hears its text after every token. A request is answered as soon as its row
is finished (its stop token, a stop string, or its budget), not when the whole batch ends, and a stream
whose client has gone stops its row; the batch ends when every row is finished. Requests whose sampling
settings differ cannot share a generate() call, so each batch takes the oldest request and those waiting
with the same settings.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from glmtune.inference.engine import ChatEngine, Completion, Row


@dataclass
class Pending:
    """One request waiting for its answer."""

    prompt: list[int]  # the chat prompt's ids
    budget: int
    stop: list[str] | None
    sampling: dict[str, Any]
    answer: asyncio.Future = field(repr=False)
    streams: bool = False
    # Streaming: the latest text (only the newest matters, so a slow client never makes it pile up) and
    # the event that says there is news; `gone`: the client left, the row can stop.
    shown: str = ""
    news: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    gone: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def settings(self) -> tuple:
        return tuple(sorted(self.sampling.items()))


class Batcher:
    """Answers requests in batches of up to `max_batch_size`; one batch runs at a time.

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

    def _enqueue(self, prompt: list[int], overrides: dict[str, Any], streams: bool) -> Pending:
        settings = dict(overrides)
        budget = settings.pop("max_new_tokens")
        stop = settings.pop("stop", None)
        loop = asyncio.get_running_loop()
        item = Pending(prompt, budget, stop, settings, loop.create_future(), streams=streams)
        # A request whose client has gone (its future cancelled) stops its row, if it is in a batch.
        item.answer.add_done_callback(lambda answer: item.gone.set() if answer.cancelled() else None)
        self.pending.append(item)
        if self.drain_task is None or self.drain_task.done():
            self.drain_task = asyncio.create_task(self._drain())
        return item

    async def complete(self, prompt: list[int], overrides: dict[str, Any]) -> Completion:
        """The answer to one prompt, as `ChatEngine.complete_prompts([prompt], **overrides)` gives it."""
        return await self._enqueue(prompt, overrides, streams=False).answer

    async def stream(self, prompt: list[int], overrides: dict[str, Any]) -> AsyncIterator[str | Completion]:
        """The answer so far (str) as tokens arrive, then the finished Completion. Closing the iterator early
        (the client gone) stops the request's row."""
        item = self._enqueue(prompt, overrides, streams=True)
        try:
            while not item.answer.done():
                await item.news.wait()
                item.news.clear()
                if not item.answer.done():
                    yield item.shown
            yield item.answer.result()  # raises the batch's failure, if it failed
        finally:
            item.gone.set()
            item.answer.cancel()  # no-op once answered; else it leaves the queue, or its batch stops it

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
                    _settle(item, error=err)

    def _generate(self, batch: list[Pending], loop: asyncio.AbstractEventLoop) -> None:
        """Runs in a worker thread; each request hears on the loop of its text and its answer."""

        def row(item: Pending) -> Row:
            def on_text(text: str) -> None:
                loop.call_soon_threadsafe(_show, item, text)

            def on_done(completion: Completion) -> None:
                loop.call_soon_threadsafe(_settle, item, completion)

            on_text_ = on_text if item.streams else None
            return Row(item.prompt, item.budget, item.stop, on_text_, on_done, item.gone.is_set)

        self.engine.generate_rows([row(item) for item in batch], **batch[0].sampling)


def _show(item: Pending, text: str) -> None:
    item.shown = text
    item.news.set()


def _settle(item: Pending, completion: Completion | None = None, error: Exception | None = None) -> None:
    """Give a waiting request its answer or error, unless its client has gone (or it has one already)."""
    if item.answer.done():
        return
    if error is not None:
        item.answer.set_exception(error)
    else:
        item.answer.set_result(completion)
    item.news.set()
