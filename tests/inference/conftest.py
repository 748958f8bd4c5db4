"""Fixtures of the inference tests: a tiny ChatGLM2 of our own and a LoRA adapter on it with non-zero weights.

The adapter is not trained: its LoRA B matrices (zero at initialisation, which would make merging trivially
exact) and its full copy of the output layer are filled with seeded noise, so base and base + adapter differ.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmtune.config import TaskConfig, TinyModelArgs, parse_args
from glmtune.inference.cli import inference_parser

REPO = Path(__file__).resolve().parents[2]


def task_config(*flags: str) -> TaskConfig:
    """A TaskConfig as the inference scripts parse it (config/default.yaml, then `flags`)."""
    cfg, _ = parse_args(inference_parser("test"), list(flags))
    return cfg


def run_script(script: str, *args: str, stdin: str = "", timeout: int = 180) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, with `stdin` piped in; fails on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from glmtune.demo.tiny import build_tiny_chatglm2

    folder = tmp_path_factory.mktemp("models") / "tiny-chatglm2"
    return build_tiny_chatglm2(folder, TinyModelArgs(texts=[str(REPO / "data" / "train.json")]))


@pytest.fixture(scope="session")
def lora_adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA artifact folder as train() writes it: adapter, tokenizer, hyperparameters.yaml."""
    from glmtune.models.loading import load_model, load_tokenizer
    from glmtune.training.methods import apply_method, save_artifact
    from glmtune.training.trainer import write_hparams

    cfg = task_config("--model.path", str(tiny_model), "--method", "lora")
    model = apply_method(load_model(tiny_model, torch_dtype="float32"), cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # lora_A / lora_B and the trained copy of output_layer
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("runs") / "lora" / "final"
    save_artifact(model, "lora", folder)
    load_tokenizer(tiny_model).save_pretrained(str(folder))
    write_hparams(cfg, folder)
    return folder


@pytest.fixture(scope="session")
def base_engine(tiny_model):
    from glmtune.inference.artifacts import load_base

    return load_base(task_config("--model.path", str(tiny_model)))
