"""The data side of `stage: dpo` and `stage: reward`: which `data:` and method settings preference training can
honour, and the pair records with their loaders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from glmtune.config import ConfigError, TaskConfig, check_data_files, resolve_path
from glmtune.data.dataset import RecordDataset
from glmtune.data.preference import PairCollator, PairRecords, build_pair_records
from glmtune.data.prepare import build_settings, make_template, tokenizer_fingerprint
from glmtune.demo.tiny import ensure_model
from glmtune.models.families import chat_family, resolve_family
from glmtune.tokenizers.template_choice import resolve_template_name
from glmtune.training.data import ResumableDataLoader
from glmtune.training.distributed import is_deepspeed, load_deepspeed_config


def check_preference_config(cfg: TaskConfig) -> None:
    """Refuse the settings `stage: dpo` / `stage: reward` cannot honour, rather than ignore them."""
    stage = cfg.stage
    if stage == "dpo" and cfg.method in ("full", "freeze") and shards_parameters(cfg.train.strategy):
        # Its reference is a frozen copy of the whole model, which this strategy would not shard.
        raise ConfigError(
            f"stage: dpo with method {cfg.method} keeps a frozen copy of the model as its reference, which "
            f"train.strategy={cfg.train.strategy} would not shard: use ddp or deepspeed_stage_2, or an adapter "
            "method (lora, adalora, ia3, ptv2), whose reference is the model with the adapter off"
        )
    d = cfg.data
    unsupported = {
        "data.format": (d.format, "auto"),
        "data.strategy": (d.strategy, "truncate"),
        "data.multi_turn": (d.multi_turn, "per_turn"),
        "data.packing": (d.packing, False),
        "data.eval_ratio": (d.eval_ratio, 0.0),
        "data.on_error": (d.on_error, "raise"),
        "data.num_workers": (d.num_workers, 1),
        "data.ensure_answer_min_length": (d.ensure_answer_min_length, None),
    }
    if stage == "reward":  # a reward model scores answers, it does not write them
        unsupported["train.eval_generate"] = (cfg.train.eval_generate, 0)
    for key, (value, default) in unsupported.items():
        if value != default:
            raise ConfigError(
                f"{key}={value!r} is not supported with stage: {stage} (preference pairs are read by their keys, "
                f"a too long pair loses prompt tokens first, eval pairs come from data.eval_files); set it "
                f"to {default!r}"
            )
    if stage == "reward" and shards_parameters(cfg.train.strategy):
        # The value head lives beside the model, and only the model's tensors are gathered for saving.
        raise ConfigError(
            f"stage: reward does not support train.strategy={cfg.train.strategy} yet (the value head would be "
            "saved from a shard); use ddp or deepspeed_stage_2"
        )


def shards_parameters(strategy: str) -> bool:
    """Whether `train.strategy` keeps each process a shard of the weights (FSDP, ZeRO-3)."""
    if strategy == "fsdp":
        return True
    if not is_deepspeed(strategy):
        return False
    return load_deepspeed_config(strategy).get("zero_optimization", {}).get("stage") == 3


@dataclass
class PreparedPairs:
    tokenizer: Any
    template_name: str
    records: PairRecords


def prepare_pairs(cfg: TaskConfig) -> PreparedPairs:
    """Build (or reuse) the pair records of `cfg.data`, rendered by the model's chat template."""

    train_files = check_data_files(cfg.data.train_files, "data.train_files")
    eval_files = check_data_files(cfg.data.eval_files, "data.eval_files")
    settings = build_settings(cfg.data, train_files, eval_files)
    model_path = ensure_model(cfg.model.path, cfg.model.tiny)
    family = resolve_family(resolve_path(cfg.model.path), cfg.model.family)
    name = resolve_template_name(cfg.data.template, chat_family(model_path, family))
    template = make_template(str(model_path), family, name, cfg.model.trust_remote_code)
    records = build_pair_records(settings, template, f"{name}:{tokenizer_fingerprint(model_path)}")
    return PreparedPairs(template.tokenizer, name, records)


def preference_loaders(cfg: TaskConfig) -> tuple[PreparedPairs, ResumableDataLoader, DataLoader | None]:
    """The pair records and their training and eval loaders (B pairs = 2B sequences per batch)."""
    prepared = prepare_pairs(cfg)
    collate = PairCollator(pad_token_id=prepared.tokenizer.pad_token_id)
    workers = cfg.train.dataloader_workers
    train_loader = ResumableDataLoader(
        RecordDataset(prepared.records.train_dir),
        batch_size=cfg.train.batch_size,
        shuffle=cfg.data.shuffle,
        seed=cfg.train.seed,
        collate_fn=collate,
        num_workers=workers,
    )
    eval_dir = prepared.records.eval_dir
    eval_loader = (
        DataLoader(
            RecordDataset(eval_dir),
            batch_size=cfg.train.eval_batch_size,
            collate_fn=collate,
            num_workers=workers,
        )
        if eval_dir is not None
        else None
    )
    return prepared, train_loader, eval_loader
