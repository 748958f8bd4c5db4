"""infer_api.py itself: --help, and a real server process serving a LoRA artifact it recognised on its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")
httpx = pytest.importorskip("httpx")

from tests.serving.live_server import API_KEY, script_server  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "infer_api.py", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_help_lists_the_server_flags():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for flag in (
        "--host",
        "--port",
        "--api-key",
        "--model_kind",
        "--checkpoint",
        "--ui",
        "--generation.max_new_tokens",
    ):
        assert flag in result.stdout, flag


@pytest.fixture
def lora_artifact(tmp_path) -> Path:
    """A LoRA adapter on the tiny model, as training writes it (random, non-zero weights: no training needed)."""
    import torch

    from glmtune.config import build_parser, parse_args
    from glmtune.demo.tiny import ensure_model
    from glmtune.models.loading import load_model
    from glmtune.training.methods import apply_method, save_artifact
    from glmtune.training.trainer import write_hparams

    cfg, _ = parse_args(build_parser("test"), ["--method", "lora"])
    model = apply_method(load_model(ensure_model(cfg.model.path, cfg.model.tiny)), cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init: make the adapter change the answers
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    folder = save_artifact(model, "lora", tmp_path / "run" / "final")
    write_hparams(cfg, folder)
    return folder


@pytest.mark.slow
def test_script_serves_a_lora_checkpoint_with_the_key_from_the_environment(lora_artifact, engine):
    from glmtune.config import build_parser, parse_args
    from glmtune.inference.artifacts import load_lora

    env = {**os.environ, "GLMTUNE_API_KEY": API_KEY}
    with script_server("--checkpoint", str(lora_artifact), env=env) as live:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        models = httpx.get(f"{live.url}/v1/models", headers=auth, timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["tiny-chatglm2+run"]
        assert httpx.post(f"{live.url}/", json={"prompt": "你好"}, timeout=30).status_code == 401
        body = httpx.post(f"{live.url}/", json={"prompt": "你好"}, headers=auth, timeout=120).json()
    assert live.returncode == [0], live.output
    cfg, _ = parse_args(build_parser("test"), [])
    served = load_lora(cfg, lora_artifact)
    assert body["response"] == served.chat("你好")[0]
    assert body["response"] != engine.chat("你好")[0], "the adapter did not change the answer: was it loaded?"
