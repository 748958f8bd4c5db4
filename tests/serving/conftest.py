"""A tiny base model loaded once, and a live API server with a key (see live_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def engine():
    """The default config's tiny ChatGLM2 (built on first use), greedy."""
    from glmtune.config import build_parser, parse_args
    from glmtune.inference.artifacts import load_base

    cfg, _ = parse_args(build_parser("serving tests"), [])
    assert not cfg.generation.do_sample, "these tests compare greedy answers"
    return load_base(cfg)


@pytest.fixture(scope="session")
def api_server(engine) -> Iterator:
    """The API with an API key, live on localhost (needs the 'serve' extras)."""
    pytest.importorskip("fastapi", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")
    pytest.importorskip("uvicorn", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")
    from glmtune.serving.api import create_app
    from tests.serving.live_server import API_KEY, start_server

    live = start_server(create_app(engine, model_name="tiny-test", api_key=API_KEY))
    yield live
    live.stop()
