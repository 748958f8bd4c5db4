"""Batched generation: requests that wait while the model is busy share one generate(), each answer still
exactly its solo answer, with its own max_tokens and stop strings. Against a live server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")

from glmtune.serving.api import create_app  # noqa: E402
from glmtune.serving.batching import Batcher, Pending  # noqa: E402
from glmtune.serving.limits import ServingLimits  # noqa: E402
from tests.serving.live_server import start_server  # noqa: E402

QUERIES = ["你好", "介绍一下北京和上海的区别吧", "讲个故事", "1+1=?", "山间茶舍几点开门？请详细说明", "hi"]


def request(i: int) -> tuple[str, int, list[str] | None]:
    """The i-th test request: a query, its own max_tokens, and for some a stop string."""
    return QUERIES[i % len(QUERIES)], 4 + 5 * (i % 4), (["的"] if i % 3 == 0 else None)


@pytest.mark.slow
def test_waiting_requests_are_batched_and_equal_their_solo_answers(engine):
    app = create_app(engine, limits=ServingLimits(max_batch_size=8))
    live = start_server(app)
    batcher: Batcher = app.state.batcher
    count = 12

    def ask(i: int) -> dict:
        query, max_tokens, stop = request(i)
        body = {"messages": [{"role": "user", "content": query}], "max_tokens": max_tokens, "stop": stop}
        return httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=120).json()

    try:
        with ThreadPoolExecutor(count) as pool, engine._lock:  # busy model: the requests queue up
            futures = [pool.submit(ask, i) for i in range(count)]
            deadline = time.monotonic() + 60
            # The first batch (whatever had arrived when it started) waits for the lock; the rest queue.
            while len(batcher.pending) + sum(batcher.batch_sizes) < count:
                assert time.monotonic() < deadline, f"only {len(batcher.pending)} requests queued"
                time.sleep(0.05)
        answers = [f.result() for f in futures]
    finally:
        live.stop()
    # Whatever queued behind the first batch runs in batches of at most 8, oldest first.
    rest = count - batcher.batch_sizes[0]
    assert batcher.batch_sizes[1:] == [min(rest, 8), *([rest - 8] if rest > 8 else [])]
    for i, answer in enumerate(answers):
        query, max_tokens, stop = request(i)
        solo = engine.complete(query, max_new_tokens=max_tokens, stop=stop)
        choice = answer["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == (solo.text, solo.finish_reason), i
        assert answer["usage"]["completion_tokens"] == solo.completion_tokens, i


def test_a_batch_takes_the_oldest_request_and_those_with_its_settings(engine):
    async def take() -> list[list[str]]:
        loop = asyncio.get_running_loop()
        batcher = Batcher(engine, max_batch_size=2)

        def pending(query: str, sampling: dict) -> Pending:
            return Pending([ord(query)], 4, None, sampling, loop.create_future())

        greedy, warm = {"do_sample": False}, {"do_sample": True, "temperature": 0.7}
        batcher.pending = [pending("a", warm), pending("b", greedy), pending("c", warm), pending("d", warm)]
        batcher.pending[2].answer.cancel()  # its client left
        return [[chr(p.prompt[0]) for p in batcher._take()] for _ in range(4)]

    assert asyncio.run(take()) == [["a", "d"], ["b"], [], []]
