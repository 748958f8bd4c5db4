"""Batched generation: requests that wait while the model is busy, streamed or not, share one generate(), each
answer still exactly its solo answer, with its own max_tokens and stop strings. Against a live server on
127.0.0.1; and the engine's rows: answered when they finish, stopped when their client has gone."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")

from glmtune.inference.engine import Row  # noqa: E402
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
        """Every other request streams; its events are put together into the shape of a whole answer."""
        query, max_tokens, stop = request(i)
        body = {"messages": [{"role": "user", "content": query}], "max_tokens": max_tokens, "stop": stop}
        if i % 2 == 0:
            return httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=120).json()
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        response = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=120)
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        choices = [e["choices"][0] for e in events if e["choices"]]
        text = "".join(c["delta"].get("content") or "" for c in choices)
        return {
            "choices": [{"message": {"content": text}, "finish_reason": choices[-1]["finish_reason"]}],
            "usage": events[-1]["usage"],
        }

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


class ForwardCounter:
    """Counts the model's forward passes (one per generated token)."""

    def __init__(self, model) -> None:
        self.calls = 0
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        self.calls += 1


def test_each_row_is_answered_when_it_finishes_not_when_the_batch_ends(engine):
    prompts = [engine.prompt_ids("你好"), engine.prompt_ids("讲个故事")]
    solo = [engine.complete_prompts([p], max_new_tokens=n)[0] for p, n in zip(prompts, (2, 12), strict=True)]
    assert [c.completion_tokens for c in solo] == [2, 12], "the test needs answers that run to their budgets"
    counter = ForwardCounter(engine.model)
    heard: list[tuple[int, int]] = []
    try:
        rows = [
            Row(prompt, budget, on_done=lambda c, row=row: heard.append((row, counter.calls)))
            for row, (prompt, budget) in enumerate(zip(prompts, (2, 12), strict=True))
        ]
        answers = engine.generate_rows(rows)
    finally:
        counter.handle.remove()
    assert answers == solo
    # the short row is answered after its 2 tokens, while the long one still has 10 to go
    assert heard == [(0, 2), (1, 12)]


def test_the_batch_ends_once_every_row_has_met_its_stop_string(engine):
    queries = ["你好", "讲个故事"]
    full = [engine.complete(q, max_new_tokens=40) for q in queries]
    assert all(c.completion_tokens == 40 and len(c.text) > 6 for c in full), "needs long answers"
    stops = [[c.text[3:5]] for c in full]  # text that comes early in each answer
    counter = ForwardCounter(engine.model)
    try:
        answers = engine.batch_complete(queries, row_budgets=[40, 40], row_stops=stops)
    finally:
        counter.handle.remove()
    assert [a.text for a in answers] == [
        c.text[: c.text.index(s[0])].strip() for c, s in zip(full, stops, strict=True)
    ]
    assert all(a.finish_reason == "stop" for a in answers)
    assert counter.calls < 40, "generation ran on after every row had stopped"


def test_a_row_whose_client_has_gone_stops_and_the_batch_ends_without_it(engine):
    prompts = [engine.prompt_ids("讲个故事"), engine.prompt_ids("你好")]
    counter = ForwardCounter(engine.model)
    heard: list = []
    try:
        rows = [
            Row(prompts[0], 30, on_done=heard.append, cancelled=lambda: counter.calls >= 3),
            Row(prompts[1], 6),
        ]
        answers = engine.generate_rows(rows)
    finally:
        counter.handle.remove()
    assert counter.calls == 6, "the batch ran for the row that had gone"
    assert heard == [answers[0]] and answers[0].completion_tokens == 3
    assert answers[1] == engine.complete_prompts([prompts[1]], max_new_tokens=6)[0]


def test_a_streaming_row_hears_its_text_grow_to_its_answer(engine):
    prompts = [engine.prompt_ids("讲个故事"), engine.prompt_ids("你好")]
    shown: list[str] = []
    answers = engine.generate_rows([Row(prompts[0], 12, on_text=shown.append), Row(prompts[1], 4)])
    assert answers[0] == engine.complete_prompts([prompts[0]], max_new_tokens=12)[0]
    assert len(shown) >= 6 and all(b.startswith(a) for a, b in zip(shown, shown[1:]))
    assert answers[0].text.startswith(shown[-1].strip())


def test_beam_search_rows_are_cut_after_generate_and_streams_are_refused(engine):
    """Beam search has no row text to follow token by token: whole answers still come back (each its solo
    answer), a stream is a clear error."""
    prompts = [engine.prompt_ids("你好"), engine.prompt_ids("讲个故事")]
    solo = [engine.complete_prompts([p], max_new_tokens=6, num_beams=2)[0] for p in prompts]
    assert engine.complete_prompts(prompts, row_budgets=[6, 6], num_beams=2)[0].text == solo[0].text
    with pytest.raises(ValueError, match="streaming needs generation.num_beams 1"):
        engine.generate_rows([Row(prompts[0], 4, on_text=print)], num_beams=2)


def test_a_stream_on_a_beam_search_server_is_a_400(engine, monkeypatch):
    import dataclasses

    from fastapi.testclient import TestClient

    monkeypatch.setattr(engine, "generation", dataclasses.replace(engine.generation, num_beams=2))
    api = TestClient(create_app(engine), raise_server_exceptions=False)
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
    assert api.post("/v1/chat/completions", json={**body, "stream": True}).status_code == 400
    assert api.post("/v1/chat/completions", json=body).status_code == 200
