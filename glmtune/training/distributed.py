"""Strategies and precision: from `train.strategy` / `train.precision` to Lightning objects, and back to
plain tensors at the end of a sharded run.

- `auto` / `ddp` / `ddp_spawn`: Lightning's own. Multi-node is `num_nodes` plus the usual MASTER_ADDR,
  MASTER_PORT and NODE_RANK in each machine's environment.
- `fsdp`: full sharding wrapped per transformer block, original parameters kept (PEFT freezes part of them).
- `deepspeed_stage_2[_offload]`, `deepspeed_stage_3[_offload]` or a JSON file: ZeRO from the presets in deepspeed/*.json beside this file.
  Checkpoints of adapter methods leave the frozen base out; the final artifact is gathered on rank 0, so a
  ZeRO-3 run ends with an adapter / model folder that loads for inference without a conversion step.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from torch import nn

from glmtune.config import ConfigError, TaskConfig, resolve_path
from glmtune.training.methods import block_list, is_adapter_weight
from glmtune.training.registry import ADAPTER_METHODS

DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"
DEEPSPEED_PRESETS = {
    "deepspeed_stage_2": "zero2.json",
    "deepspeed_stage_2_offload": "zero2_offload.json",
    "deepspeed_stage_3": "zero3.json",
    "deepspeed_stage_3_offload": "zero3_offload.json",
}
LIGHTNING_STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "single_device")


def is_deepspeed(spec: str) -> bool:
    return spec in DEEPSPEED_PRESETS or spec.endswith(".json")


def load_deepspeed_config(spec: str) -> dict[str, Any]:
    """A DeepSpeed config dict from a preset name or a JSON file (train.strategy)."""
    path = DEEPSPEED_DIR / DEEPSPEED_PRESETS[spec] if spec in DEEPSPEED_PRESETS else resolve_path(spec)
    if not Path(path).is_file():
        raise ConfigError(f"train.strategy: DeepSpeed config not found: {spec}")
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.strategy: {path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.strategy: {path}: zero_optimization.stage must be 0..3, got {stage!r}")
    # Lightning fills these from the Trainer (accumulate_grad_batches, precision); two sources would disagree.
    for key in ("gradient_accumulation_steps", "fp16", "bf16"):
        if key in config:
            raise ConfigError(f"train.strategy: {path}: remove {key!r}; it comes from the train section")
    return config


def make_strategy(cfg: TaskConfig, model: nn.Module) -> Any:
    """The Lightning strategy for `train.strategy` (a name Lightning knows is passed through)."""
    spec = cfg.train.strategy
    if is_deepspeed(spec):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if cfg.method == "adalora":
            raise ConfigError(
                "adalora under DeepSpeed is not supported: its rank masking edits weights that ZeRO keeps in "
                "its own fp32 partitions; use train.strategy ddp, or method lora"
            )
        return DeepSpeedStrategy(
            config=load_deepspeed_config(spec),
            # Adapter checkpoints: only what trains (the base is reloaded from model.path on resume).
            exclude_frozen_parameters=cfg.method != "full",
        )
    if spec == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        if cfg.method == "adalora":
            raise ConfigError(
                "adalora under FSDP is not supported (its masks need unsharded weights); use ddp"
            )
        block = type(block_list(model)[0])
        return FSDPStrategy(
            auto_wrap_policy={block},
            activation_checkpointing_policy={block} if cfg.train.gradient_checkpointing else None,
            use_orig_params=True,  # PEFT / freeze: frozen and trained weights share flat buffers
            state_dict_type="full",
            sharding_strategy="FULL_SHARD",
        )
    if spec not in LIGHTNING_STRATEGIES:
        raise ConfigError(
            f"train.strategy: unknown {spec!r}; use one of {', '.join(LIGHTNING_STRATEGIES)}, fsdp, "
            f"{', '.join(DEEPSPEED_PRESETS)} or a DeepSpeed JSON file"
        )
    return spec


class AdapterHalfPrecision(HalfPrecision):
    """`16-true` / `bf16-true` for adapter methods: the frozen backbone in half, the adapter in fp32.

    Lightning's HalfPrecision casts the whole module; a LoRA or prefix update that small would then be lost to
    bf16 rounding. PEFT layers and the prefix encoder cast their inputs and outputs, so mixing works.
    """

    def convert_module(self, module: nn.Module) -> nn.Module:
        dtype = self._desired_input_dtype
        for name, p in module.named_parameters():
            if p.dtype.is_floating_point and not (p.requires_grad and is_adapter_weight(name)):
                p.data = p.data.to(dtype)
        for b in module.buffers():
            if b.dtype.is_floating_point:
                b.data = b.data.to(dtype)
        return module


def precision_args(cfg: TaskConfig) -> dict[str, Any]:
    """Trainer keyword arguments for `train.precision`."""
    precision = cfg.train.precision
    sharded = is_deepspeed(cfg.train.strategy) or cfg.train.strategy == "fsdp"
    if precision in ("16-true", "bf16-true") and cfg.method in ADAPTER_METHODS and not sharded:
        return {"plugins": [AdapterHalfPrecision(precision)]}
    return {"precision": precision}


def is_mixed(precision: str) -> bool:
    return precision.endswith("-mixed")


def gather_model_state(trainer: L.Trainer, module: L.LightningModule) -> Mapping[str, torch.Tensor] | None:
    """Full tensors of `module.model` on global rank 0 when the strategy shards them (ZeRO-3, FSDP).

    Returns None where the local module already holds everything (single device, DDP, ZeRO-1/2) and on
    ranks other than 0. Every rank must call it: the gathering is collective.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        engine = strategy.deepspeed_engine
        gather = engine._zero3_consolidated_16bit_state_dict
        kwargs = {}
        # An adapter needs only what trained; a freeze / full artifact is a whole model folder.
        if (
            "exclude_frozen_parameters" in inspect.signature(gather).parameters
            and module.method in ADAPTER_METHODS
        ):
            kwargs["exclude_frozen_parameters"] = True
        state = gather(**kwargs)
    elif isinstance(strategy, FSDPStrategy):
        state = strategy.lightning_module_state_dict()
    else:
        return None
    if not trainer.is_global_zero:
        return None
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
