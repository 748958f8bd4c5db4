"""`train(cfg)`: records -> model with its method -> Lightning Trainer -> saved artifact.

Returns its metrics and the paths it wrote, so tests call it directly (STYLE.md, point 9).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

from glmtune.config import TaskConfig
from glmtune.training.methods import apply_method, count_parameters, save_artifact
from glmtune.training.module import CausalLMModule, steps_per_epoch

HPARAMS_FILE = "hyperparameters.yaml"


@dataclass
class TrainResult:
    artifact_dir: Path
    checkpoint_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)


def load_for_method(cfg: TaskConfig, device: str | None = None) -> torch.nn.Module:
    """The backbone as the method needs it (P-Tuning v2 adds a prefix encoder at load time)."""
    from glmtune.models.loading import load_model

    ptv2 = cfg.method == "ptv2"
    return load_model(
        cfg.model.path,
        torch_dtype=cfg.model.dtype,
        quantization_bit=cfg.model.quantization_bit,
        pre_seq_len=cfg.ptv2.pre_seq_len if ptv2 else None,
        prefix_projection=cfg.ptv2.prefix_projection if ptv2 else False,
        family=cfg.model.family,
        device=device,
    )


def _strategy(cfg: TaskConfig):
    s = cfg.train.strategy
    if s.endswith(".json"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        from glmtune.config import resolve_path

        return DeepSpeedStrategy(config=str(resolve_path(s)))
    return s


def make_trainer(cfg: TaskConfig, total_steps: int, callbacks: list | None = None, **overrides) -> L.Trainer:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    out = Path(cfg.train.output_dir)
    ckpt_dir = out / "checkpoints"
    has_eval = bool(cfg.data.eval_files)
    checkpoints = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss" if has_eval else None,
                        save_last=True, save_top_k=1, mode="min"),
    ]
    if cfg.train.save_every_n_steps:
        checkpoints.append(
            ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step}", every_n_train_steps=cfg.train.save_every_n_steps,
                            save_top_k=-1)
        )
    loggers = [CSVLogger(out, name="logs")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(out, name="tensorboard"))
    except ImportError:
        pass
    kwargs = dict(
        default_root_dir=out,
        max_epochs=cfg.train.max_epochs,
        max_steps=total_steps if cfg.train.max_steps > 0 else -1,
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        num_nodes=cfg.train.num_nodes,
        strategy=_strategy(cfg),
        precision=cfg.train.precision,
        accumulate_grad_batches=cfg.train.accumulate_grad_batches,
        gradient_clip_val=cfg.train.gradient_clip_val or None,
        log_every_n_steps=cfg.train.log_every_n_steps,
        callbacks=[*checkpoints, LearningRateMonitor("step"), *(callbacks or [])],
        logger=loggers,
        enable_model_summary=False,
        limit_val_batches=1.0 if has_eval else 0,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def _resume_path(cfg: TaskConfig) -> str | None:
    r = cfg.train.resume
    if r in (None, ""):
        return None
    path = Path(cfg.train.output_dir) / "checkpoints" / "last.ckpt" if r == "last" else Path(r)
    if not path.is_file():
        raise FileNotFoundError(f"train.resume: checkpoint not found: {path}")
    return str(path)


def train(cfg: TaskConfig, module_cls: type[CausalLMModule] = CausalLMModule, **trainer_overrides) -> TrainResult:
    from glmtune.data.dataset import RecordDataset, collate_fn
    from glmtune.data.prepare import prepare_records

    L.seed_everything(cfg.train.seed, workers=True)
    records = prepare_records(cfg)
    tokenizer = records.tokenizer
    train_set = RecordDataset(records.train_path)
    eval_set = RecordDataset(records.eval_path) if records.eval_path else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    epoch_steps = steps_per_epoch(len(train_set), cfg.train.batch_size, cfg.train.accumulate_grad_batches, world)
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else epoch_steps * cfg.train.max_epochs

    model = load_for_method(cfg)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = apply_method(model, cfg, total_steps)
    model.train()
    trainable, total = count_parameters(model)
    print(f"parameters: {trainable:,} trainable / {total:,} total ({100 * trainable / max(total, 1):.2f}%)")

    collate = collate_fn(pad_token_id=tokenizer.pad_token_id)
    # The sampler's shuffling is seeded, so a resumed run sees the same order (exact resume).
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collate,
                              num_workers=cfg.train.dataloader_workers)
    eval_loader = (
        DataLoader(eval_set, batch_size=cfg.train.eval_batch_size, collate_fn=collate,
                   num_workers=cfg.train.dataloader_workers)
        if eval_set is not None and len(eval_set)
        else None
    )
    module = module_cls(model, cfg.train, total_steps, method=cfg.method)
    trainer = make_trainer(cfg, total_steps, **trainer_overrides)

    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_hparams(cfg, out)
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=eval_loader, ckpt_path=_resume_path(cfg))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    artifact = out / "final"
    if trainer.is_global_zero:
        save_artifact(module.model, cfg.method, artifact)
        tokenizer.save_pretrained(str(artifact))
        write_hparams(cfg, artifact)
        (artifact / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(artifact_dir=artifact, checkpoint_dir=out / "checkpoints", metrics=metrics)


def write_hparams(cfg: TaskConfig, folder: Path) -> Path:
    """The resolved config beside every artifact, read back by the inference scripts (STYLE.md, point 7)."""
    path = folder / HPARAMS_FILE
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False))
    return path
