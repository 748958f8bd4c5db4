"""bitsandbytes 8-bit (LLM.int8) and 4-bit NormalFloat (QLoRA) weights for training adapters, CUDA only.

ChatGLM's own int8/int4 format (glmtune.models.quantization) runs anywhere in plain torch; bitsandbytes is
the other road: its kernels are faster on GPUs, NF4 keeps more precision per bit, and PEFT has LoRA,
AdaLoRA and IA3 layers for it. The float model is loaded first, its block linears are swapped for
bitsandbytes layers holding the same weights, and moving them to the GPU quantizes them.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import nn

from glmtune.config import ConfigError
from glmtune.models.families import model_family
from glmtune.models.quantization import QUANTIZED_LAYER_NAMES

BnbMode = Literal["bnb8", "nf4"]


def require_bitsandbytes(what: str) -> None:
    """Fail early, naming the config key, where bitsandbytes cannot run."""
    if not torch.cuda.is_available():
        raise ConfigError(f"{what} needs a CUDA GPU (bitsandbytes kernels); none is visible here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"{what} needs bitsandbytes: pip install 'glmtune[quant]' ({err})") from None


def _targets(model: nn.Module) -> list[str]:
    """Block linears: ChatGLM's four per block; for other models every linear but the output head."""

    family = model_family(model)
    head = model.get_output_embeddings()
    if family != "hf":
        names = "|".join(QUANTIZED_LAYER_NAMES)
        pattern = re.compile(rf"(?:^|\.)layers\.\d+\.(?:[\w.]+\.)?(?:{names})$")
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def quantize_bnb(
    model: nn.Module, mode: BnbMode, device: torch.device, compute_dtype: torch.dtype
) -> nn.Module:
    """Swap the block linears for bitsandbytes layers and move the model to `device` (which quantizes them).

    Marks the model `is_loaded_in_8bit` / `is_loaded_in_4bit`, the flags PEFT reads to pick its bitsandbytes
    adapter layers.
    """
    require_bitsandbytes(f"model.quantization={mode}")
    import bitsandbytes as bnb

    if device.type != "cuda":
        raise ConfigError(f"model.quantization={mode} needs train.accelerator gpu, not {device.type}")
    targets = _targets(model)
    if not targets:
        raise ValueError(f"model.quantization={mode}: found no linear layers to quantize")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear: nn.Linear = getattr(parent, child)
        has_bias = linear.bias is not None
        weight = linear.weight.data.to(torch.float16 if mode == "bnb8" else compute_dtype)
        if mode == "bnb8":
            new = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
            )
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                compute_dtype=compute_dtype,
                compress_statistics=True,  # double quantization of the block scales (QLoRA)
                quant_type="nf4",
            )
            new.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, compress_statistics=True, quant_type="nf4"
            )
        if has_bias:
            new.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, child, new)
    model.to(device)  # Int8Params / Params4bit quantize on their way to the GPU
    if mode == "bnb8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    # The QLoRA recipe: norms and embeddings in fp32 for stability, inputs requiring grad for checkpointing.
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
