"""Each training key has its effect: tested through `train(cfg)` on the tiny ChatGLM2, as train.py runs it."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from glmtune.config import ConfigError
from glmtune.training.trainer import train
from tests.training.conftest import make_cfg


class Batches(L.Callback):
    """The input_ids of every training micro-batch, in the order the run took them."""

    def __init__(self) -> None:
        self.input_ids: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.loader = trainer.train_dataloader
        self.input_ids.append(batch["input_ids"].clone())


class TrainedWeights(L.Callback):
    def on_train_end(self, trainer, module) -> None:
        self.weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def validated_steps(out: Path) -> list[int]:
    rows = csv.DictReader(next((out / "logs").rglob("metrics.csv")).open())
    return [int(r["step"]) for r in rows if r.get("val_loss")]


# ---------------------------------------------------------------------------------------------- data


class Validations(L.Callback):
    """val_loss after each validation, by the optimizer step it followed."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_validation_end(self, trainer, module) -> None:
        self.losses[trainer.global_step] = float(trainer.callback_metrics["val_loss"])


@pytest.mark.slow
def test_eval_ratio_validates_and_keeps_the_best(tiny_chatglm2, tiny_data, tmp_path):
    # A learning rate high enough that the eval loss turns up again: the best is not the last.
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", max_epochs=2, eval_every_n_steps=2)
    cfg.train.learning_rate = 0.2
    cfg.data.eval_files, cfg.data.eval_ratio = [], 0.25
    validations = Validations()
    result = train(cfg, callbacks=[validations], enable_progress_bar=False)

    losses = validations.losses
    best_step = min(losses, key=losses.get)
    assert len(losses) >= 3 and best_step != max(losses), losses
    best = torch.load(result.checkpoint_dir / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["global_step"] == best_step
    assert result.best_artifact_dir is not None
    saved = json.loads((result.best_artifact_dir / "metrics.json").read_text())
    assert saved["val_loss"] == pytest.approx(losses[best_step], abs=1e-5)


def test_eval_generate_needs_eval_files(tiny_chatglm2, tiny_data, tmp_path):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", eval_generate=2)
    cfg.data.eval_files, cfg.data.eval_ratio = [], 0.25
    with pytest.raises(ConfigError, match="train.eval_generate.*data.eval_files"):
        train(cfg, enable_progress_bar=False)


@pytest.mark.parametrize("shuffle", [False, True])
def test_shuffle_false_keeps_record_order(shuffle, tiny_chatglm2, tiny_data, tmp_path):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", max_steps=5)
    cfg.data.eval_files = []
    cfg.data.shuffle = shuffle
    batches = Batches()
    train(cfg, callbacks=[batches], enable_progress_bar=False)

    loader = batches.loader
    in_record_order = [
        loader.collate_fn([loader.dataset[i] for i in range(start, start + 4)])["input_ids"]
        for start in range(0, 20, 4)
    ]
    assert len(batches.input_ids) == 5
    same = all(torch.equal(a, b) for a, b in zip(batches.input_ids, in_record_order))
    assert same is not shuffle


# ---------------------------------------------------------------------------------------------- train


def shown_bars(text: str) -> set[tuple[str, str, str]]:
    """(epoch, position, total) of every state the training progress bar printed."""
    return set(re.findall(r"^Epoch (\S+): .*?\| *(\d+)/(\S+) ", text.replace("\r", "\n"), flags=re.MULTILINE))


def test_progress_bar_counts_micro_batches_under_max_steps(tiny_chatglm2, tiny_data, tmp_path, capsys):
    # 9 micro-batches per epoch, 2 per step (5 steps, the last one short): 7 steps are epoch 0 and 4
    # micro-batches of epoch 1.
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", max_steps=7, accumulate_grad_batches=2)
    cfg.data.eval_files = []
    train(cfg)
    bars = shown_bars(capsys.readouterr().out)
    assert {(epoch, total) for epoch, _, total in bars} == {("0", "9"), ("1", "4")}, sorted(bars)
    assert {("0", "9", "9"), ("1", "4", "4")} <= bars  # each epoch's bar reaches its end

    # Resumed after 2 steps (4 micro-batches of epoch 0), the bar goes on from there.
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "parts", max_steps=2, accumulate_grad_batches=2)
    cfg.data.eval_files = []
    train(cfg, enable_progress_bar=False)
    cfg.train.max_steps, cfg.train.resume = 7, "last"
    capsys.readouterr()
    train(cfg)
    bars = shown_bars(capsys.readouterr().out)
    assert {(epoch, total) for epoch, _, total in bars} == {("0", "9"), ("1", "4")}, sorted(bars)
    # (a bar is printed at 0 as it is reset for the next epoch)
    assert min(int(n) for epoch, n, _ in bars if epoch == "0" and n != "0") == 5


class Steps(L.Callback):
    """The optimizer steps after which the run validated, and the gradient norm each optimizer step used."""

    def __init__(self) -> None:
        self.validated: list[int] = []
        self.grad_norms: list[float] = []

    def on_train_start(self, trainer, module) -> None:
        # After the step: Lightning runs the backward inside optimizer.step (its closure), then clips.
        def norm_at_step(optimizer, args, kwargs) -> None:
            grads = [
                p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
            ]
            self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        trainer.optimizers[0].register_step_post_hook(norm_at_step)

    def on_validation_end(self, trainer, module) -> None:
        self.validated.append(trainer.global_step)


def test_eval_every_n_steps_counts_optimizer_steps(tiny_chatglm2, tiny_data, tmp_path):
    # 17 micro-batches of 2 per epoch, 2 per optimizer step: 9 steps per epoch, the last one short.
    cfg = make_cfg(
        tiny_chatglm2, tiny_data, tmp_path / "run", max_epochs=2, batch_size=2, accumulate_grad_batches=2
    )
    cfg.train.eval_every_n_steps = 3
    steps = Steps()
    train(cfg, callbacks=[steps], enable_progress_bar=False)
    assert steps.validated == [3, 6, 9, 12, 15, 18]


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_gradient_clip_val_clips_what_the_optimizer_sees(clip, tiny_chatglm2, tiny_data, tmp_path):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", max_steps=4, gradient_clip_val=clip)
    cfg.data.eval_files = []
    steps = Steps()
    train(cfg, callbacks=[steps], enable_progress_bar=False)
    assert len(steps.grad_norms) == 4
    if clip:
        assert max(steps.grad_norms) == pytest.approx(0.05, rel=1e-4)
    else:  # the same run unclipped: its gradients are larger than the clip
        assert min(steps.grad_norms) > 0.1


@pytest.mark.slow
def test_dataloader_workers_train_the_same(tiny_chatglm2, tiny_data, tmp_path):
    weights = {}
    for workers in (0, 2):
        cfg = make_cfg(
            tiny_chatglm2, tiny_data, tmp_path / f"w{workers}", max_steps=4, dataloader_workers=workers
        )
        cfg.data.eval_files = []
        cfg.lora.dropout = 0.1
        trained, batches = TrainedWeights(), Batches()
        train(cfg, callbacks=[trained, batches], enable_progress_bar=False)
        assert batches.loader.num_workers == workers
        weights[workers] = trained.weights
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[2][name], value, atol=0, rtol=0)
    first = next(iter(weights[0]))
    assert not torch.equal(weights[0][first], torch.zeros_like(weights[0][first]))


def test_compile_mode_reaches_torch_compile(tiny_chatglm2, tiny_data, tmp_path, monkeypatch):
    modes: list[str | None] = []

    def recording_compile(fn, *args, **kwargs):
        modes.append(kwargs.get("mode"))
        return fn  # eager: only the mode matters here

    monkeypatch.setattr(torch, "compile", recording_compile)
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", max_steps=1, compile=True)
    cfg.train.compile_mode = "max-autotune-no-cudagraphs"
    cfg.data.eval_files = []
    train(cfg, enable_progress_bar=False)
    assert modes == ["max-autotune-no-cudagraphs"] * 2  # one per block of the 2-layer model


class PeftConfigAtStart(L.Callback):
    def on_train_start(self, trainer, module) -> None:
        self.config = module.model.peft_config["default"]


def test_adalora_schedule_keys_reach_peft(tiny_chatglm2, tiny_data, tmp_path):
    # 9 micro-batches per epoch, 2 per optimizer step: 5 steps per epoch, 10 in all.
    cfg = make_cfg(
        tiny_chatglm2, tiny_data, tmp_path / "run", "adalora", max_epochs=2, accumulate_grad_batches=2
    )
    cfg.data.eval_files = []
    a = cfg.adalora
    a.init_r, a.target_r, a.tinit_ratio, a.tfinal_ratio, a.delta_t = 6, 3, 0.2, 0.3, 2
    a.beta1, a.beta2, a.orth_reg_weight = 0.7, 0.8, 0.3
    seen = PeftConfigAtStart()
    result = train(cfg, callbacks=[seen], enable_progress_bar=False)
    c = seen.config
    assert result.total_steps == result.global_step == c.total_step == 10
    assert (c.init_r, c.target_r, c.tinit, c.tfinal, c.deltaT) == (6, 3, 2, 3, 2)
    assert (c.beta1, c.beta2, c.orth_reg_weight) == (0.7, 0.8, 0.3)


@pytest.mark.parametrize("train_head", [False, True])
def test_freeze_train_head_trains_the_final_norm_and_output_layer(
    train_head, tiny_chatglm2, tiny_data, tmp_path
):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", "freeze", max_steps=2)
    cfg.data.eval_files = []
    cfg.freeze.num_trainable_layers, cfg.freeze.train_head = 1, train_head
    trained = TrainedWeights()
    train(cfg, callbacks=[trained], enable_progress_bar=False)
    head = {"model.transformer.encoder.final_layernorm.weight", "model.transformer.output_layer.weight"}
    assert (head <= trained.weights.keys()) is train_head
    assert not head & trained.weights.keys() or train_head
    assert any(".layers.1." in n for n in trained.weights) and not any(
        ".layers.0." in n for n in trained.weights
    )
