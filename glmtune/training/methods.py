"""Applying a tuning method to an unchanged backbone, and saving what it trained.

`full` and `freeze` only flip `requires_grad`; `ptv2` trains the prefix encoder the model was loaded with;
`lora`, `adalora` and `ia3` wrap the model with PEFT (glmtune.training.registry says which method is which).
One predicate, `requires_grad`, decides what is trained, what an adapter checkpoint holds, and what the
parameter count reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmtune.config import ConfigError, TaskConfig
from glmtune.models.families import GLM_HF_MODEL_TYPES, model_family
from glmtune.models.quantization import QuantizedLinear
from glmtune.models.saving import save_model
from glmtune.training.lora_layers import register_lora_layers
from glmtune.training.registry import METHODS, PEFT_METHODS

CHATGLM_LINEARS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
# PEFT's own ChatGLM default for IA3: rescale the attention output and the input of the down projection.
CHATGLM_IA3_TARGETS = ["query_key_value", "dense_4h_to_h"]
# The same linears in transformers' GlmForCausalLM / Glm4ForCausalLM (PEFT has no default for them):
# query_key_value split into q/k/v_proj, dense is o_proj, dense_h_to_4h gate_up_proj, dense_4h_to_h down_proj.
GLM_HF_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
GLM_HF_IA3_TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]
IA3_FEEDFORWARD = ("dense_4h_to_h", "down_proj", "fc2", "c_proj")
# Parameter-name pieces of the small weights a method adds; they stay fp32 whatever the base dtype.
ADAPTER_WEIGHT_MARKERS = ("lora_", "ia3_", "prefix_encoder.")


def block_list(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, whatever the architecture calls them."""
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not candidates:
        raise ValueError("model has no block list")
    return max(candidates, key=len)


def _is_glm_hf(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in GLM_HF_MODEL_TYPES


def default_target_modules(model: nn.Module) -> list[str] | str:
    """LoRA / AdaLoRA targets when lora.target_modules is not set: each block's linears."""
    if model_family(model) != "hf":
        return CHATGLM_LINEARS
    return GLM_HF_LINEARS if _is_glm_hf(model) else "all-linear"


def default_ia3_targets(model: nn.Module) -> list[str] | str:
    """IA3 targets when lora.target_modules is not set: PEFT's ChatGLM choice for the GLM networks."""
    if model_family(model) != "hf":
        return CHATGLM_IA3_TARGETS
    return GLM_HF_IA3_TARGETS if _is_glm_hf(model) else "all-linear"


def is_int_quantized(model: nn.Module) -> bool:
    """Whether the block linears hold ChatGLM int8/int4 weights (glmtune.models.quantization)."""

    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def is_bnb_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def is_adapter_weight(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_WEIGHT_MARKERS)


def check_method(cfg: TaskConfig) -> None:
    """Refuse impossible method / quantization combinations before anything is loaded."""
    method = cfg.method
    int_bits = cfg.model.quantization_bit
    bnb = cfg.model.quantization != "none"
    if int_bits and bnb:
        raise ConfigError("model.quantization_bit and model.quantization (bitsandbytes) exclude each other")
    quantized = (
        f"model.quantization_bit={int_bits}" if int_bits else f"model.quantization={cfg.model.quantization}"
    )
    if (int_bits or bnb) and METHODS[method].trains_base_weights:
        raise ConfigError(
            f"method {method!r} trains the block weights, which {quantized} stores as integers: use lora or ptv2 "
            "on a quantized model, or load it in float (quantization_bit: 0, quantization: none)"
        )
    if int_bits and method in ("adalora", "ia3"):
        raise ConfigError(
            f"method {method!r} is not available on ChatGLM int{int_bits} weights (PEFT has no {method} layer for "
            "glmtune's QuantizedLinear): use lora or ptv2 with quantization_bit, or bitsandbytes "
            "(model.quantization: bnb8 / nf4, CUDA)"
        )
    if (int_bits or bnb) and method == "lora" and cfg.lora.use_dora:
        raise ConfigError(f"lora.use_dora rescales the base weights and needs them in float, not {quantized}")
    if bnb and method == "ptv2":
        raise ConfigError(
            "ptv2 on bitsandbytes weights is not supported; use model.quantization_bit 4 / 8 (ChatGLM's own int "
            "weights) for P-Tuning v2 on a quantized model"
        )


def apply_method(model: nn.Module, cfg: TaskConfig, total_steps: int | None = None) -> nn.Module:
    """Mark what trains for `cfg.method`; returns the (possibly PEFT-wrapped) model."""
    check_method(cfg)
    method = cfg.method
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(p.dtype.is_floating_point)
        return model
    if method == "freeze":
        return _freeze(model, cfg)
    if method == "ptv2":
        if getattr(model.config, "pre_seq_len", None) is None:
            raise ValueError("ptv2 needs a model loaded with pre_seq_len (load_model(..., pre_seq_len=N))")
        for name, p in model.named_parameters():
            p.requires_grad_("prefix_encoder." in name)
        # The published recipe: the prefix encoder learns in fp32 even when the backbone runs in half.
        model.transformer.prefix_encoder.float()
        return model
    if method in PEFT_METHODS:
        return _wrap_peft(model, cfg, total_steps)
    raise ValueError(f"unknown method {method!r}")


def _freeze(model: nn.Module, cfg: TaskConfig) -> nn.Module:
    blocks = block_list(model)
    n = len(blocks)
    f = cfg.freeze
    trainable_from = n - f.num_trainable_layers if f.num_trainable_layers is not None else f.num_frozen_layers
    if not 0 <= trainable_from < n:
        key = (
            "freeze.num_trainable_layers"
            if f.num_trainable_layers is not None
            else "freeze.num_frozen_layers"
        )
        raise ConfigError(
            f"{key}: the model has {n} blocks, so training must start at block 0..{n - 1}, "
            f"not {trainable_from}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(blocks)[trainable_from:]:
        for p in block.parameters():
            p.requires_grad_(p.dtype.is_floating_point)
    if f.train_head:
        # What follows the blocks: the final norm and the output layer (never the input embedding, even tied).
        in_blocks = {id(p) for p in blocks.parameters()}
        embedding = model.get_input_embeddings().weight
        for name, p in model.named_parameters():
            if id(p) in in_blocks or p is embedding or "prefix_encoder." in name:
                continue
            p.requires_grad_(p.dtype.is_floating_point)
    return model


def adalora_schedule(cfg: TaskConfig, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) in optimizer steps; PEFT needs a non-empty budgeting phase between them."""
    a = cfg.adalora
    tinit = int(a.tinit_ratio * total_steps)
    tfinal = int(a.tfinal_ratio * total_steps)
    if tinit + tfinal >= total_steps:
        raise ConfigError(
            f"adalora: {total_steps} optimizer steps leave no budgeting phase between tinit={tinit} and "
            f"tfinal={tfinal}; train longer or lower adalora.tinit_ratio / adalora.tfinal_ratio"
        )
    return tinit, tfinal


def _wrap_peft(model: nn.Module, cfg: TaskConfig, total_steps: int | None) -> nn.Module:
    from peft import AdaLoraConfig, IA3Config, LoraConfig, TaskType, get_peft_model

    family = model_family(model)
    common: dict[str, Any] = {"task_type": TaskType.CAUSAL_LM, "modules_to_save": cfg.lora.modules_to_save}
    targets = cfg.lora.target_modules or default_target_modules(model)
    if cfg.method == "lora":
        peft_config = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            use_dora=cfg.lora.use_dora,
            use_rslora=cfg.lora.use_rslora,
            target_modules=targets,
            **common,
        )
        register_lora_layers(peft_config, fused=not cfg.lora.use_dora)
    elif cfg.method == "adalora":
        if not total_steps:
            raise ValueError("adalora needs the number of optimizer steps for its rank-budget schedule")
        a = cfg.adalora
        tinit, tfinal = adalora_schedule(cfg, total_steps)
        peft_config = AdaLoraConfig(
            init_r=a.init_r,
            target_r=a.target_r,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=a.delta_t,
            beta1=a.beta1,
            beta2=a.beta2,
            orth_reg_weight=a.orth_reg_weight,
            total_step=total_steps,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=targets,
            **common,
        )
    else:
        targets = cfg.lora.target_modules or default_ia3_targets(model)
        if isinstance(targets, str):
            feedforward = None
        else:
            feedforward = [t for t in targets if t.split(".")[-1] in IA3_FEEDFORWARD]
        peft_config = IA3Config(target_modules=targets, feedforward_modules=feedforward, **common)
    wrapped = get_peft_model(model, peft_config)
    wrapped.glmtune_family = family
    return wrapped


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the tensors being trained (what method checkpoints hold)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a packed int4 byte counts as the two weights it holds."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_type", None) is not None or type(p).__name__ == "Params4bit":
            n *= 2  # bitsandbytes 4-bit: two weights per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def cast_trainable_fp32(model: nn.Module) -> int:
    """Keep trained weights in fp32 (master weights for mixed precision); returns how many were cast."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            cast += 1
    return cast


class _StateView:
    """What `save_model` reads from a model (config, family, state_dict), over a gathered state dict."""

    def __init__(self, model: nn.Module, state: Mapping[str, torch.Tensor]):
        self.config = model.config
        self.glmtune_family = model_family(model)
        self._state = state

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        return self._state


def save_artifact(
    model: nn.Module, method: str, folder: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None
) -> Path:
    """Save what the method produced: an adapter, a published P-Tuning v2 file, or a whole model folder.

    `state_dict` (keys as in `model.state_dict()`) replaces the model's own tensors: under ZeRO-3 / FSDP the
    local module holds only a shard, so the trainer gathers the full tensors first and passes them here.
    """

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    artifact = METHODS[method].artifact
    if artifact == "adapter":
        model.save_pretrained(str(folder), state_dict=dict(state_dict) if state_dict is not None else None)
    elif artifact == "prefix":
        # The published P-Tuning scripts save only transformer.prefix_encoder.* in pytorch_model.bin.
        source = state_dict if state_dict is not None else model.state_dict()
        state = {k: v.detach().cpu().float().clone() for k, v in source.items() if "prefix_encoder." in k}
        if not state:
            raise ValueError("ptv2: the model holds no prefix_encoder weights to save")
        torch.save(state, folder / "pytorch_model.bin")
    elif model_family(model) == "hf":
        model.save_pretrained(str(folder), state_dict=dict(state_dict) if state_dict is not None else None)
    else:
        save_model(_StateView(model, state_dict) if state_dict is not None else model, folder)
    return folder
