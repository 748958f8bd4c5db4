"""Trainer settings: precision, optimizers, schedules, accumulation, checkpoints and logs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from glmtune.config import ConfigError, TrainArgs
from glmtune.training.module import build_optimizer, build_scheduler, steps_per_epoch
from glmtune.training.trainer import train
from tests.training.conftest import make_cfg
from tests.training.training_helpers import LossProbe


def lrs(scheduler: str, steps: int = 20, **kwargs) -> list[float]:
    args = TrainArgs(learning_rate=1.0, scheduler=scheduler, warmup_steps=4, **kwargs)
    param = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = build_optimizer([("w", param)], args)
    schedule = build_scheduler(optimizer, args, steps)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return values


def test_schedules_warm_up_then_follow_their_shape():
    for name in ("constant", "linear", "cosine", "cosine_restarts"):
        values = lrs(name)
        assert values[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0]), name
    assert lrs("constant")[4:] == pytest.approx([1.0] * 16)
    linear = lrs("linear")
    assert linear[12] == pytest.approx((20 - 12) / 16)
    cosine = lrs("cosine")
    assert cosine[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    # Two cycles: back at the peak half-way through the decay.
    restarts = lrs("cosine_restarts", num_cycles=2)
    assert restarts[12] == pytest.approx(1.0) and restarts[11] < 0.2


def test_weight_decay_skips_vectors():
    args = TrainArgs(weight_decay=0.1)
    matrix, vector = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([("m", matrix), ("v", vector)], args)
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays == {id(matrix): 0.1, id(vector): 0.0}


def test_adamw_is_fused():
    args = TrainArgs()
    on_cpu = build_optimizer([("m", torch.nn.Parameter(torch.zeros(2, 2)))], args)
    assert on_cpu.defaults["fused"] is True
    if torch.cuda.is_available():
        on_gpu = build_optimizer([("m", torch.nn.Parameter(torch.zeros(2, 2, device="cuda")))], args)
        assert on_gpu.defaults["fused"] is True
    on_meta = build_optimizer([("m", torch.nn.Parameter(torch.zeros(2, 2, device="meta")))], args)
    assert not on_meta.defaults["fused"]  # elsewhere: PyTorch's default implementation
    # Lightning refuses to clip the gradients of an optimizer that unscales them itself (mixed precision).
    clipped = TrainArgs(precision="bf16-mixed", gradient_clip_val=1.0)
    assert not build_optimizer([("m", torch.nn.Parameter(torch.zeros(2, 2)))], clipped).defaults["fused"]
    unclipped = TrainArgs(precision="bf16-mixed", gradient_clip_val=0.0)
    assert build_optimizer([("m", torch.nn.Parameter(torch.zeros(2, 2)))], unclipped).defaults["fused"]


def test_lion_and_missing_8bit_adam():
    pytest.importorskip("lion_pytorch")
    from lion_pytorch import Lion

    param = [("w", torch.nn.Parameter(torch.zeros(2, 2)))]
    assert isinstance(build_optimizer(param, TrainArgs(optimizer="lion")), Lion)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.optimizer=adamw8bit needs a CUDA GPU"):
            build_optimizer(param, TrainArgs(optimizer="adamw8bit"))


def test_steps_per_epoch_counts_the_short_last_accumulation():
    assert steps_per_epoch(36, batch_size=4, accumulate=2) == 5  # 9 micro-batches
    assert steps_per_epoch(36, batch_size=4, accumulate=1, world_size=2) == 5  # 18 per rank
    assert steps_per_epoch(3, batch_size=8, accumulate=4) == 1


def test_train_args_are_validated():
    with pytest.raises(ConfigError, match="train.precision"):
        TrainArgs(precision="fp8")
    with pytest.raises(ConfigError, match="train.accumulate_grad_batches"):
        TrainArgs(accumulate_grad_batches=0)
    assert TrainArgs(precision=32).precision == "32"


def test_fp16_mixed_precision_needs_a_gpu(tiny_chatglm2, tiny_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU error")
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", "lora", precision="16-mixed")
    with pytest.raises(ConfigError, match="16-mixed needs a GPU"):
        train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "dtype", "precision", "optimizer"),
    [
        ("lora", "float32", "bf16-mixed", "lion"),
        ("lora", "float32", "bf16-true", "adamw"),
        ("ptv2", "bfloat16", "32", "adamw"),  # half backbone, fp32 prefix encoder
        ("ptv2", "float32", "bf16-true", "adamw"),
    ],
)
def test_precisions_train_with_fp32_adapters(
    method, dtype, precision, optimizer, tiny_chatglm2, tiny_data, tmp_path
):
    import lightning as L

    class Dtypes(L.Callback):
        def on_train_end(self, trainer, module):
            self.dtypes = {n: p.dtype for n, p in module.named_parameters()}

    dtypes, probe = Dtypes(), LossProbe()
    lr = {"lora": 1e-2, "ptv2": 5e-2}[method] * (0.1 if optimizer == "lion" else 1.0)
    cfg = make_cfg(
        tiny_chatglm2,
        tiny_data,
        tmp_path / "run",
        method,
        max_epochs=2,
        precision=precision,
        optimizer=optimizer,
        learning_rate=lr,
    )
    cfg.data.eval_files = []
    cfg.model.dtype = dtype
    train(cfg, callbacks=[dtypes, probe], enable_progress_bar=False)
    assert probe.after < probe.before - 0.05, (probe.before, probe.after)
    marker = "lora_" if method == "lora" else "prefix_encoder."
    adapter = {n: d for n, d in dtypes.dtypes.items() if marker in n}
    frozen = {n: d for n, d in dtypes.dtypes.items() if marker not in n and d.is_floating_point}
    assert adapter and set(adapter.values()) == {torch.float32}
    half = dtype == "bfloat16" or precision == "bf16-true"
    assert set(frozen.values()) == {torch.bfloat16 if half else torch.float32}


@pytest.mark.slow
def test_checkpoints_logs_and_best_artifact(tiny_chatglm2, tiny_data, tmp_path):
    cfg = make_cfg(
        tiny_chatglm2,
        tiny_data,
        tmp_path / "run",
        "lora",
        max_epochs=2,
        save_every_n_steps=4,
        accumulate_grad_batches=2,
    )
    result = train(cfg, enable_progress_bar=False)
    ckpts = result.checkpoint_dir
    assert result.global_step == 10  # 9 micro-batches per epoch, 2 per step: 5 steps per epoch
    assert {p.name for p in ckpts.iterdir()} == {"last.ckpt", "best.ckpt", "step-4.ckpt", "step-8.ckpt"}
    checkpoint = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    # Only the adapter: PEFT's LoRA matrices.
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])
    assert checkpoint["glmtune"]["method"] == "lora"
    best = torch.load(ckpts / "best.ckpt", map_location="cpu", weights_only=False)
    assert (
        result.best_artifact_dir is not None
        and (result.best_artifact_dir / "adapter_model.safetensors").is_file()
    )
    state = next(v for k, v in best["callbacks"].items() if "'val_loss'" in k)
    assert float(state["best_model_score"]) <= result.metrics["val_loss"] + 1e-6
    out = Path(cfg.train.output_dir)
    metrics_csv = next((out / "logs").rglob("metrics.csv")).read_text()
    assert "train_loss" in metrics_csv and "val_loss" in metrics_csv and "lr-AdamW" in metrics_csv
    pytest.importorskip("tensorboard")
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_ptv2_checkpoint_holds_only_the_prefix(tiny_chatglm2, tiny_data, tmp_path):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", "ptv2", max_steps=2)
    cfg.data.eval_files = []
    result = train(cfg, enable_progress_bar=False)
    state = torch.load(result.checkpoint_dir / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    assert state and all(".prefix_encoder." in k for k in state)
