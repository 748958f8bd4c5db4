"""Fixtures of the training tests: a small ChatGLM2 and ChatGLM-6B, a small data set, a config builder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from glmtune.config import DataArgs, LoraArgs, ModelArgs, TaskConfig, TinyModelArgs, TrainArgs
from tests.conftest import REPO_ROOT

# A smaller shape than the embedded default: every method trains in a few seconds on two CPU cores.
TINY = TinyModelArgs(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    multi_query_group_num=2,
    kv_channels=16,
    ffn_hidden_size=128,
    vocab_size=800,
    texts=[str(REPO_ROOT / "data" / "train.json")],
    seed=0,
)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """24 training and 8 evaluation dialogues of the project's data (short samples, same format)."""
    folder = tmp_path_factory.mktemp("train-data")
    train = json.loads((REPO_ROOT / "data" / "train.json").read_text(encoding="utf-8"))
    dev = json.loads((REPO_ROOT / "data" / "dev.json").read_text(encoding="utf-8"))
    paths = {"train": folder / "train.json", "dev": folder / "dev.json"}
    paths["train"].write_text(json.dumps(train[:24], ensure_ascii=False), encoding="utf-8")
    paths["dev"].write_text(json.dumps(dev[:8], ensure_ascii=False), encoding="utf-8")
    return paths


@pytest.fixture(scope="session")
def tiny_chatglm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from glmtune.demo.tiny import build_tiny_chatglm2

    return build_tiny_chatglm2(tmp_path_factory.mktemp("models") / "tiny-chatglm2", TINY)


@pytest.fixture(scope="session")
def tiny_chatglm(tmp_path_factory: pytest.TempPathFactory, reference_dir: Path) -> Path:
    """A ChatGLM-6B (v1) checkpoint: the reference folder (2 layers, hidden 64, random fp16 weights in the
    published sharded pytorch_model-*.bin layout, the real ice_text.model tokenizer), copied so runs can
    write beside it."""
    folder = tmp_path_factory.mktemp("models") / "tiny-chatglm"
    shutil.copytree(reference_dir / "chatglm-6b-tiny", folder, ignore=shutil.ignore_patterns("golden.pt"))
    return folder


def make_cfg(
    model_dir: Path, data: dict[str, Path], out: Path, method: str = "lora", **train: object
) -> TaskConfig:
    """A short CPU run: 24 samples, batch 4, lr 1e-2, evaluation on 8 samples after every epoch."""
    cfg = TaskConfig()
    cfg.method = method
    cfg.model = ModelArgs(path=str(model_dir), dtype="float32")
    cfg.data = DataArgs(
        train_files=[str(data["train"])],
        eval_files=[str(data["dev"])],
        max_seq_length=48,
        num_workers=1,
        output_dir=str(out.parent / f"records-{Path(model_dir).name}"),
    )
    cfg.lora = LoraArgs(r=8, alpha=16, dropout=0.0)
    cfg.ptv2.pre_seq_len = 4
    settings = dict(
        output_dir=str(out),
        max_epochs=2,
        batch_size=4,
        eval_batch_size=4,
        learning_rate=1e-2,
        scheduler="constant",
        accelerator="cpu",
        devices=1,
        log_every_n_steps=1,
        gradient_clip_val=1.0,
    )
    settings.update(train)
    cfg.train = TrainArgs(**settings)
    return cfg
