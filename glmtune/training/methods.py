"""Tuning methods as wrappers around an unchanged backbone (STYLE.md, point 5).

`full` and `freeze` only flip `requires_grad`; `ptv2` trains the prefix encoder the model was loaded with;
`lora`, `adalora` and `ia3` wrap the model with PEFT. One predicate, `requires_grad`, decides what is
trained, what an adapter checkpoint holds, and what the parameter count reports (STYLE.md, point 6).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glmtune.config import TaskConfig

CHATGLM_LINEARS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
PEFT_METHODS = ("lora", "adalora", "ia3")


def block_list(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, whatever the architecture calls them."""
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not candidates:
        raise ValueError("model has no block list")
    return max(candidates, key=len)


def default_target_modules(model: nn.Module) -> list[str] | str:
    family = getattr(model, "glmtune_family", "hf")
    return CHATGLM_LINEARS if family != "hf" else "all-linear"


def apply_method(model: nn.Module, cfg: TaskConfig, total_steps: int | None = None) -> nn.Module:
    """Mark what trains for `cfg.method`; returns the (possibly PEFT-wrapped) model."""
    method = cfg.method
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(p.dtype.is_floating_point)
        return model
    if method == "freeze":
        blocks = block_list(model)
        n = len(blocks)
        trainable_from = (
            n - cfg.freeze.num_trainable_layers
            if cfg.freeze.num_trainable_layers is not None
            else cfg.freeze.num_frozen_layers
        )
        if not 0 <= trainable_from < n:
            raise ValueError(f"freeze: the model has {n} blocks; cannot start training at block {trainable_from}")
        for p in model.parameters():
            p.requires_grad_(False)
        for block in list(blocks)[trainable_from:]:
            for p in block.parameters():
                p.requires_grad_(p.dtype.is_floating_point)
        return model
    if method == "ptv2":
        if getattr(model.config, "pre_seq_len", None) is None:
            raise ValueError("ptv2 needs a model loaded with pre_seq_len (load_model(..., pre_seq_len=N))")
        for name, p in model.named_parameters():
            p.requires_grad_("prefix_encoder." in name)
        return model
    if method in PEFT_METHODS:
        return _wrap_peft(model, cfg, total_steps)
    raise ValueError(f"unknown method {method!r}")


def _wrap_peft(model: nn.Module, cfg: TaskConfig, total_steps: int | None) -> nn.Module:
    from peft import AdaLoraConfig, IA3Config, LoraConfig, TaskType, get_peft_model

    from glmtune.models import quantization

    quantization.register_with_peft()
    targets = cfg.lora.target_modules or default_target_modules(model)
    common = {"task_type": TaskType.CAUSAL_LM, "target_modules": targets}
    if cfg.method == "lora":
        peft_config = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            modules_to_save=cfg.lora.modules_to_save,
            use_dora=cfg.lora.use_dora,
            use_rslora=cfg.lora.use_rslora,
            **common,
        )
    elif cfg.method == "adalora":
        if not total_steps:
            raise ValueError("adalora needs the number of optimizer steps for its rank-budget schedule")
        a = cfg.adalora
        tinit = int(a.tinit_ratio * total_steps)
        tfinal = int(a.tfinal_ratio * total_steps)
        if tinit + tfinal >= total_steps:  # PEFT requires a non-empty budgeting phase
            tinit, tfinal = 0, max(0, total_steps // 4)
        peft_config = AdaLoraConfig(
            init_r=a.init_r,
            target_r=a.target_r,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=a.delta_t,
            total_step=total_steps,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            **common,
        )
    else:
        ff = ["dense_h_to_4h", "dense_4h_to_h"] if targets == CHATGLM_LINEARS else None
        peft_config = IA3Config(feedforward_modules=ff, **common)
    wrapped = get_peft_model(model, peft_config)
    wrapped.glmtune_family = getattr(model, "glmtune_family", "hf")
    return wrapped


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the tensors being trained (what method checkpoints hold)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_artifact(model: nn.Module, method: str, folder: str | Path) -> Path:
    """Save what the method produced: an adapter, a published P-Tuning v2 file, or a whole model folder."""
    from glmtune.models.loading import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if method in PEFT_METHODS:
        model.save_pretrained(folder)
    elif method == "ptv2":
        # The published P-Tuning scripts save only transformer.prefix_encoder.* in pytorch_model.bin.
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "prefix_encoder." in k}
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_model(model, folder)
    return folder
