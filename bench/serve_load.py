"""Serving throughput and latency under load: batched generation against one-at-a-time, in one run.

Starts `infer_api.py` twice on 127.0.0.1 (a free port; nothing else is contacted), each its own process as a
deployment runs it: once with --max_batch_size 1 (one request at a time) and once batched. For each number
of requests in flight it sends `--requests` greedy chat completions, that many at a time, from one asyncio
client in this process (so the clients do not take the server's interpreter lock), then prints requests per
second and the p50/p95 latency, and checks every answer against the engine's solo answer.

    .venv/bin/python bench/serve_load.py                     # the tiny default model, 1/4/16/32 in flight
    .venv/bin/python bench/serve_load.py --requests 64 --max_tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glmtune.config import build_parser, parse_args  # noqa: E402
from glmtune.inference.artifacts import load_base  # noqa: E402
from glmtune.inference.engine import ChatEngine  # noqa: E402
from tests.serving.live_server import script_server  # noqa: E402

QUERIES = [
    "你好",
    "介绍一下北京和上海的区别吧",
    "讲个故事",
    "1+1=?",
    "山间茶舍几点开门？请详细说明",
    "hi",
    "谢谢",
]


async def run_load(
    url: str, in_flight: int, requests: int, max_tokens: int
) -> tuple[float, list[float], list[str]]:
    """(requests per second, latencies in s, answers in request order) for `requests` sent `in_flight` at once."""
    slots = asyncio.Semaphore(in_flight)
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)

    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(i: int) -> tuple[float, str]:
            body = {
                "messages": [{"role": "user", "content": QUERIES[i % len(QUERIES)]}],
                "max_tokens": max_tokens,
            }
            async with slots:
                start = time.perf_counter()
                response = await client.post(f"{url}/v1/chat/completions", json=body)
                response.raise_for_status()
                return time.perf_counter() - start, response.json()["choices"][0]["message"]["content"]

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(requests)))
        elapsed = time.perf_counter() - start
    return requests / elapsed, [r[0] for r in results], [r[1] for r in results]


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--in_flight", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_batch_size", type=int, default=32)
    args = parser.parse_args()

    cfg, _ = parse_args(build_parser("serve_load"), [])
    engine: ChatEngine = load_base(cfg)
    solo = {q: engine.complete(q, max_new_tokens=args.max_tokens).text for q in QUERIES}
    expected = [solo[QUERIES[i % len(QUERIES)]] for i in range(args.requests)]
    print(f"model {cfg.model.path}, {args.requests} requests per row, max_tokens {args.max_tokens}, greedy")
    print(f"{'serving':<22}{'in flight':>10}{'req/s':>9}{'p50 s':>8}{'p95 s':>8}{'speed-up':>10}  answers")
    ok = True
    setups = {"one at a time": 1, f"batched (<= {args.max_batch_size})": args.max_batch_size}
    with ExitStack() as servers:
        # Both servers up at once (the idle one only waits), measured alternately at each load.
        urls = {
            label: servers.enter_context(
                script_server("--max_batch_size", str(size), "--max_queue", str(max(64, *args.in_flight)))
            ).url
            for label, size in setups.items()
        }
        for in_flight in args.in_flight:
            baseline = None
            for label, url in urls.items():
                rate, latencies, answers = asyncio.run(
                    run_load(url, in_flight, args.requests, args.max_tokens)
                )
                baseline = baseline or rate
                same = answers == expected
                ok &= same
                print(
                    f"{label:<22}{in_flight:>10}{rate:>9.1f}{percentile(latencies, 50):>8.3f}"
                    f"{percentile(latencies, 95):>8.3f}{rate / baseline:>9.1f}x  {'= solo' if same else 'DIFFER'}",
                    flush=True,
                )
    if not ok:
        print("error: some answers under load differ from the solo answers", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
