"""`train(cfg)`: records -> model with its method -> Lightning Trainer -> saved artifact.

Returns its metrics and the paths it wrote, so tests call it directly.

What a run leaves in `train.output_dir`:
    checkpoints/last.ckpt, best.ckpt (lowest val_loss), step-<N>.ckpt   Lightning checkpoints (resume); each
                written to a temporary file and renamed, last.ckpt again after every step-<N>.ckpt
    final/      the method's artifact after the last step: adapter (PEFT), pytorch_model.bin (P-Tuning v2)
                or a model folder (full, freeze); tokenizer files and hyperparameters.yaml beside it
    best/       the same for best.ckpt, when there are eval records (eval_files or eval_ratio; single
                device and DDP runs)
    logs/       CSV metrics;  tensorboard/  TensorBoard events (when tensorboard is installed)
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

from glmtune.config import ConfigError, TaskConfig, resolve_path
from glmtune.data.dataset import RecordDataset, collate_fn
from glmtune.data.preference import iter_pairs
from glmtune.data.prepare import prepare_records
from glmtune.demo.tiny import ensure_model
from glmtune.inference.predict import prediction_items
from glmtune.models.families import chat_family, resolve_family
from glmtune.models.loading import load_model
from glmtune.models.value_head import save_value_head
from glmtune.tokenizers.template_choice import get_template
from glmtune.training.bnb import quantize_bnb, require_bitsandbytes
from glmtune.training.compile import compile_blocks
from glmtune.training.data import ResumableDataLoader
from glmtune.training.distributed import (
    gather_model_state,
    is_deepspeed,
    is_mixed,
    make_strategy,
    precision_args,
)
from glmtune.training.generation_eval import GenerationEval
from glmtune.training.methods import (
    apply_method,
    cast_trainable_fp32,
    check_method,
    count_parameters,
    save_artifact,
)
from glmtune.training.module import CausalLMModule, check_optimizer, steps_per_epoch
from glmtune.training.preference import DPOModule, frozen_copy
from glmtune.training.preference_data import check_preference_config, preference_loaders
from glmtune.training.registry import HPARAMS_FILE
from glmtune.training.reward import RewardModule, freeze_unused_output_layer

# The stages trained on preference pairs (glmtune.data.preference) rather than supervised samples.
PREFERENCE_STAGES = ("dpo", "reward")


@dataclass
class TrainResult:
    artifact_dir: Path
    checkpoint_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    best_artifact_dir: Path | None = None
    total_steps: int = 0
    global_step: int = 0
    skipped_steps: int = 0


def load_for_method(cfg: TaskConfig, device: str | None = None) -> torch.nn.Module:
    """The backbone as the method needs it (P-Tuning v2 adds a prefix encoder at load time)."""

    ptv2 = cfg.method == "ptv2"
    return load_model(
        ensure_model(cfg.model.path, cfg.model.tiny),
        torch_dtype=cfg.model.dtype,
        quantization_bit=cfg.model.quantization_bit,
        pre_seq_len=cfg.ptv2.pre_seq_len if ptv2 else None,
        prefix_projection=cfg.ptv2.prefix_projection if ptv2 else False,
        family=cfg.model.family,
        device=device,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def check_half_precision(cfg: TaskConfig) -> None:
    """GLM-4 is trained in bf16: its activations overflow fp16's range, so fp16 training ends in NaN losses."""
    fp16 = cfg.train.precision in ("16-mixed", "16-true") or cfg.model.dtype == "float16"
    folder = resolve_path(cfg.model.path)
    # A transformers-native GLM-4 folder loads as "hf" and is GLM-4 all the same.
    if (
        fp16
        and (folder / "config.json").is_file()
        and chat_family(folder, resolve_family(folder, cfg.model.family)) == "glm4"
    ):
        raise ConfigError(
            "GLM-4 overflows in fp16 (train.precision 16-*, model.dtype float16): use train.precision "
            "bf16-mixed (or bf16-true) and model.dtype bfloat16 or float32"
        )


def check_config(cfg: TaskConfig) -> None:
    """Everything that can be refused before records are built and weights loaded."""
    check_method(cfg)
    if cfg.stage in PREFERENCE_STAGES:
        check_preference_config(cfg)
    check_optimizer(cfg.train)
    check_half_precision(cfg)
    if cfg.model.quantization != "none":
        require_bitsandbytes(f"model.quantization={cfg.model.quantization}")
    if cfg.train.precision == "16-mixed" and (
        cfg.train.accelerator == "cpu" or not torch.cuda.is_available()
    ):
        # Lightning would silently switch to bf16-mixed on a CPU.
        raise ConfigError("train.precision=16-mixed needs a GPU (fp16 autocast); on CPU use bf16-mixed or 32")
    if cfg.train.compile and (is_deepspeed(cfg.train.strategy) or cfg.train.strategy == "fsdp"):
        raise ConfigError(
            f"train.compile is not supported with train.strategy={cfg.train.strategy} (the strategy wraps and "
            "partitions the blocks itself); use strategy auto or ddp, or set train.compile: false"
        )
    if cfg.train.eval_generate and not cfg.data.eval_files:
        raise ConfigError(
            "train.eval_generate answers turns of data.eval_files, and there are none"
            + (
                " (data.eval_ratio's split is kept as tokens only); name the eval data in data.eval_files"
                if cfg.data.eval_ratio
                else ""
            )
        )
    if cfg.train.checkpoint_layers is not None and not cfg.train.gradient_checkpointing:
        raise ConfigError("train.checkpoint_layers needs train.gradient_checkpointing: true")
    if cfg.train.checkpoint_layers is not None and cfg.train.strategy == "fsdp":
        raise ConfigError(
            "train.checkpoint_layers is not supported with train.strategy=fsdp (FSDP checkpoints every wrapped "
            "block itself); set it to null"
        )
    if (is_deepspeed(cfg.train.strategy) or cfg.train.strategy == "fsdp") and not torch.cuda.is_available():
        raise ConfigError(
            f"train.strategy={cfg.train.strategy}: Lightning runs DeepSpeed and FSDP on CUDA GPUs only; "
            "none is visible"
        )


def set_checkpoint_layers(model: torch.nn.Module, n: int) -> None:
    """Recompute only the first `n` blocks under gradient checkpointing (the ChatGLM models' block stacks)."""
    stacks = [m for m in model.modules() if hasattr(m, "checkpoint_layers")]
    if not stacks:
        raise ConfigError(
            f"train.checkpoint_layers: {type(model).__name__} has no selective checkpointing (ChatGLM models "
            "only); remove the key to recompute every block"
        )
    for stack in stacks:
        stack.checkpoint_layers = n


def _stop_point_checkpoint_class():
    from lightning.pytorch.callbacks import ModelCheckpoint

    class StopPointCheckpoint(ModelCheckpoint):
        """ModelCheckpoint that also writes `last` at the batch where `max_steps` ends the run.

        Lightning would otherwise save it from `on_train_epoch_end`, which it calls when max_steps stops a run
        mid-epoch: that checkpoint counts the epoch as processed, and a resume from it starts the next epoch's
        data order at the old batch position. Saved at the batch end instead, Lightning restores mid-epoch
        (and then skips its own epoch-end save: same global step).
        """

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if 0 < trainer.max_steps <= trainer.global_step and not self._should_skip_saving_checkpoint(
                trainer
            ):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    return StopPointCheckpoint


class ValidateEveryNSteps(L.Callback):
    """`train.eval_every_n_steps`: validate after every N-th optimizer step, besides each epoch's end.

    Lightning's `val_check_interval` counts micro-batches over the whole run: with gradient accumulation and an
    epoch whose last accumulation is short, its checks drift off the optimizer steps (validating, and saving
    checkpoints, in the middle of an accumulation) and it stops validating at epoch ends. This adds the step
    condition to Lightning's own decision (the epoch's end), evaluated after every micro-batch.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.validated_at = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop.epoch_loop
        lightning_decision = loop._should_check_val_fx
        self.validated_at = trainer.global_step  # a resumed run validated there already

        def should_check_val(data_fetcher: Any) -> bool:
            step = trainer.global_step
            due = step != self.validated_at and step % self.every == 0 and loop._should_check_val_epoch()
            if lightning_decision(data_fetcher) or due:
                self.validated_at = step
                return True
            return False

        loop._should_check_val_fx = should_check_val


def _atomic_checkpoint_io_class():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Writes a checkpoint to a temporary file beside it, then renames it into place.

        A run killed at any moment leaves every `*.ckpt` complete, old or new. Lightning's own save goes through
        an fsspec transaction whose temporary file lies in the system's temp folder: on another file system
        the final move is a copy, which a kill can cut short.
        """

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            try:
                with open(tmp, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    return AtomicCheckpointIO


def _step_budget_progress_bar_class():
    from lightning.pytorch.callbacks import TQDMProgressBar

    class StepBudgetProgressBar(TQDMProgressBar):
        """Lightning's bar, whose epoch total under `max_steps` counts micro-batches, not optimizer steps.

        Lightning caps the epoch's total at the optimizer steps left, so with gradient accumulation the bar
        reads e.g. 24/6; and a run resumed mid-epoch shows no total at all ("Training: 4/?").
        """

        def _epoch_total(self, done: int) -> int | float:
            """The epoch's micro-batches, up to where max_steps ends the run; `done` of them already run."""
            trainer = self.trainer
            batches = trainer.num_training_batches
            if trainer.max_steps is None or trainer.max_steps < 0:
                return batches
            left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            return min(batches, done + left)

        @property
        def total_train_batches(self) -> int | float:
            return self._epoch_total(0)  # read as an epoch starts

        def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
            # v_num is the loggers' version folder (logs/version_N), "1_0" with two loggers: not the run's.
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            return items

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            super().on_train_start(trainer, pl_module)
            if trainer.fit_loop.restarted_mid_epoch:  # Lightning then skips on_train_epoch_start
                done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
                total = self._epoch_total(done)
                self.train_progress_bar.total = None if total == float("inf") else total
                self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    return StepBudgetProgressBar


def make_trainer(
    cfg: TaskConfig,
    model: torch.nn.Module,
    has_eval: bool,
    callbacks: list | None = None,
    **overrides: Any,
) -> L.Trainer:
    """The Lightning Trainer for `cfg.train`; `has_eval`: there are eval records to validate on."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    t = cfg.train
    out = Path(t.output_dir)
    ckpt_dir = out / "checkpoints"
    checkpoints = [
        _stop_point_checkpoint_class()(
            dirpath=ckpt_dir,
            filename="best",
            monitor="val_loss" if has_eval else None,
            mode="min",
            save_top_k=1,
            save_last=True,
            # After every validation (ValidateEveryNSteps adds some mid-epoch): Lightning would otherwise
            # save only at epoch ends, when validation runs only there by its own settings.
            save_on_train_epoch_end=False if has_eval else None,
            enable_version_counter=False,
        )
    ]
    if t.save_every_n_steps:
        checkpoints.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="step-{step}",
                every_n_train_steps=t.save_every_n_steps,
                save_top_k=-1,
                # last.ckpt right after each step-<N>.ckpt: `train.resume last` continues from the newest.
                save_last=True,
                auto_insert_metric_name=False,
            )
        )
    loggers: list[Any] = [CSVLogger(out, name="logs")]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out, name="tensorboard"))
    except ImportError:
        pass
    extra_callbacks: list[L.Callback] = []
    if overrides.get("enable_progress_bar") is not False:
        extra_callbacks.append(_step_budget_progress_bar_class()())
    if has_eval and t.eval_every_n_steps:
        extra_callbacks.append(ValidateEveryNSteps(t.eval_every_n_steps))
    sharded = is_deepspeed(t.strategy) or t.strategy == "fsdp"  # these write checkpoints their own way
    precision = precision_args(cfg)
    plugins = [*precision.pop("plugins", []), *([] if sharded else [_atomic_checkpoint_io_class()()])]
    kwargs: dict[str, Any] = dict(
        default_root_dir=out,
        max_epochs=t.max_epochs if t.max_steps < 0 else -1,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(cfg, model),
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None,
        log_every_n_steps=t.log_every_n_steps,
        callbacks=[*checkpoints, LearningRateMonitor("step"), *extra_callbacks, *(callbacks or [])],
        logger=loggers,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # The training loader shards itself (ResumableSampler); Lightning must not swap its sampler.
        use_distributed_sampler=False,
        plugins=plugins or None,
        limit_val_batches=1.0 if has_eval else 0,
        **precision,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def newest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint in `folder` written last: last.ckpt, or a step-<N>.ckpt when the run was killed between
    writing it and last.ckpt (every write is atomic, so each is complete). A folder (DeepSpeed) counts too."""
    candidates = list(folder.glob("*.ckpt")) if folder.is_dir() else []
    return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), default=None)


def resume_path(cfg: TaskConfig) -> str | None:
    r = cfg.train.resume
    if r in (None, ""):
        return None
    if r == "last":
        folder = Path(cfg.train.output_dir) / "checkpoints"
        path = newest_checkpoint(folder)
        if path is None:
            raise ConfigError(f"train.resume: last: no checkpoint in {folder} (train.output_dir)")
        return str(path)
    path = resolve_path(r)
    if not path.exists():  # a file, or a folder for DeepSpeed checkpoints
        raise ConfigError(f"train.resume: checkpoint not found: {path}")
    return str(path)


def _data(cfg: TaskConfig):

    records = prepare_records(cfg)
    train_set = RecordDataset(records.train_path)
    if len(train_set) == 0:
        raise ConfigError("data.train_files: no training samples were built (all dropped or empty)")
    eval_set = RecordDataset(records.eval_path) if records.eval_path else None
    if eval_set is not None and len(eval_set) == 0:
        raise ConfigError(
            f"{records.eval_source}: no evaluation samples were built (all dropped, empty, or none drawn)"
        )
    collate = collate_fn(pad_token_id=records.tokenizer.pad_token_id)
    workers = cfg.train.dataloader_workers
    train_loader = ResumableDataLoader(
        train_set,
        batch_size=cfg.train.batch_size,
        shuffle=cfg.data.shuffle,
        seed=cfg.train.seed,
        collate_fn=collate,
        num_workers=workers,
    )
    eval_loader = (
        DataLoader(eval_set, batch_size=cfg.train.eval_batch_size, collate_fn=collate, num_workers=workers)
        if eval_set is not None
        else None
    )
    return records, train_loader, eval_loader


def generation_eval(cfg: TaskConfig, records) -> GenerationEval | None:
    """The `train.eval_generate` callback: the first N turns of the eval files (with `stage: dpo`, the first
    N pairs' prompts, against their chosen answers), scored after each evaluation."""
    if not cfg.train.eval_generate:
        return None

    items: list[dict] = []
    for file in cfg.data.eval_files:
        if cfg.stage == "dpo":  # answers to the pairs' prompts, scored against the chosen answers
            items += [
                {"query": p.query, "history": p.history, "system": p.system, "reference": p.chosen}
                for p in iter_pairs(resolve_path(file))
            ]
        else:
            items += list(prediction_items(resolve_path(file), cfg.data.format))
    template = get_template(records.template_name, records.tokenizer)
    return GenerationEval(items[: cfg.train.eval_generate], records.tokenizer, template, cfg.generation)


def train(
    cfg: TaskConfig,
    module_cls: type[CausalLMModule] = CausalLMModule,
    callbacks: list | None = None,
    **trainer_overrides: Any,
) -> TrainResult:
    """Train `cfg.method` on `cfg.data` and save the artifact; every data-parallel process runs this."""
    check_config(cfg)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    preference = cfg.stage in PREFERENCE_STAGES
    records, train_loader, eval_loader = preference_loaders(cfg) if preference else _data(cfg)
    tokenizer = records.tokenizer
    model = load_for_method(cfg)
    scorer = generation_eval(cfg, records)
    callbacks = [*(callbacks or []), *([scorer] if scorer else [])]
    has_eval = eval_loader is not None
    trainer = make_trainer(cfg, model, has_eval, callbacks=callbacks, **trainer_overrides)

    epoch_steps = steps_per_epoch(
        len(train_loader.dataset), cfg.train.batch_size, cfg.train.accumulate_grad_batches, trainer.world_size
    )
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else epoch_steps * cfg.train.max_epochs

    if cfg.model.quantization != "none":
        compute = torch.bfloat16 if "bf16" in cfg.train.precision else torch.float16
        model = quantize_bnb(model, cfg.model.quantization, trainer.strategy.root_device, compute)
    # Under FSDP the strategy checkpoints each wrapped block itself (activation_checkpointing_policy).
    if cfg.train.gradient_checkpointing and cfg.train.strategy != "fsdp":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if cfg.train.checkpoint_layers is not None:
            set_checkpoint_layers(model, cfg.train.checkpoint_layers)
    model = apply_method(model, cfg, total_steps)
    if cfg.stage == "reward":
        freeze_unused_output_layer(model)  # a reward reads the hidden states, never the logits
    if cfg.train.strategy == "fsdp":
        # FSDP flattens each wrapped block into buffers of one dtype: all fp32 under mixed precision (FSDP
        # casts to half for compute), and Lightning casts everything to half for a *-true precision.
        if is_mixed(cfg.train.precision):
            model.float()
    elif is_mixed(cfg.train.precision):
        cast_trainable_fp32(model)  # fp32 master weights; autocast runs the matmuls in half
    if cfg.train.compile:
        compile_blocks(model, cfg.train.compile_mode)
    model.train()
    trainable, total = count_parameters(model)
    if trainer.is_global_zero:
        print(
            f"parameters: {trainable:,} trainable / {total:,} total ({100 * trainable / max(total, 1):.2f}%); "
            f"{total_steps} optimizer steps"
        )

    if cfg.stage == "dpo":
        # The preference loss replaces the supervised one (models.py's loss is the sft stage's).
        dpo_cls = module_cls if issubclass(module_cls, DPOModule) else DPOModule
        # full and freeze train the weights themselves: their reference is a copy taken before training.
        reference = frozen_copy(model) if cfg.method in ("full", "freeze") else None
        module = dpo_cls(
            model, cfg.train, total_steps, method=cfg.method, dpo=cfg.dpo, reference_model=reference
        )
    elif cfg.stage == "reward":
        # The head is drawn after seed_everything, so a run starts from the same head every time.
        reward_cls = module_cls if issubclass(module_cls, RewardModule) else RewardModule
        module = reward_cls(model, cfg.train, total_steps, method=cfg.method)
    else:
        module = module_cls(model, cfg.train, total_steps, method=cfg.method)
    out = Path(cfg.train.output_dir)
    if trainer.is_global_zero:
        write_hparams(cfg, out)
    with warnings.catch_warnings():
        # ModelCheckpoint warns whenever its folder holds files: on every `train.resume`, which is what the
        # folder is for (a fresh run overwrites last.ckpt / best.ckpt, each written whole).
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        trainer.fit(
            module, train_dataloaders=train_loader, val_dataloaders=eval_loader, ckpt_path=resume_path(cfg)
        )

    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    artifact = out / "final"
    state = gather_model_state(trainer, module)  # collective: every rank calls it
    if trainer.is_global_zero:
        _save(module, cfg, artifact, tokenizer, metrics, state)
    best = _export_best(trainer, module, cfg, tokenizer) if has_eval else None
    trainer.strategy.barrier()
    return TrainResult(
        artifact_dir=artifact,
        checkpoint_dir=out / "checkpoints",
        metrics=metrics,
        best_artifact_dir=best,
        total_steps=total_steps,
        global_step=trainer.global_step,
        skipped_steps=module.bad_steps_total,
    )


def _save(
    module: CausalLMModule, cfg: TaskConfig, folder: Path, tokenizer: Any, metrics: dict, state=None
) -> None:
    save_artifact(module.model, cfg.method, folder, state_dict=state)
    if isinstance(module, RewardModule):
        save_value_head(module.value_head, folder)
    tokenizer.save_pretrained(str(folder))
    write_hparams(cfg, folder)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))


def _export_best(trainer: L.Trainer, module: CausalLMModule, cfg: TaskConfig, tokenizer: Any) -> Path | None:
    """The best checkpoint (lowest val_loss) as an artifact too (best/), where the checkpoint is one file
    holding the weights."""
    if is_deepspeed(cfg.train.strategy) or cfg.train.strategy == "fsdp":
        return None
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best or not Path(best).is_file():
        return None
    folder = Path(cfg.train.output_dir) / "best"
    if trainer.is_global_zero:
        checkpoint = torch.load(best, map_location="cpu", weights_only=False)
        module.load_state_dict(checkpoint["state_dict"])
        score = trainer.checkpoint_callback.best_model_score
        _save(module, cfg, folder, tokenizer, {"val_loss": float(score)} if score is not None else {})
    return folder


def write_hparams(cfg: TaskConfig, folder: Path) -> Path:
    """The resolved config beside every artifact, read back by the inference scripts (nobody retypes lora.r)."""
    path = folder / HPARAMS_FILE
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False))
    return path
