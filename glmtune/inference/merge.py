"""Fold a PEFT adapter into its base weights and write a complete, adapter-free model folder.

LoRA adds `B @ A * scale` to each adapted weight; after merging, the network computes the same function
with plain Linear layers, so the folder loads with `infer.py --model.path OUT` (or any ChatGLM / transformers
loader) and needs neither PEFT nor the adapter. The folder also gets the tokenizer and a
`hyperparameters.yaml` (method "full"), so `infer_finetuning.py --checkpoint OUT` reads it like a fully tuned
result.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from torch import nn

from glmtune.config import ConfigError
from glmtune.data.samples import template_name
from glmtune.inference.engine import ChatEngine
from glmtune.inference.transformers_export import check_exportable, save_transformers
from glmtune.models.families import model_family
from glmtune.models.quantization import QuantizedLinear
from glmtune.models.saving import save_model
from glmtune.training.registry import HPARAMS_FILE, tuning_method

# A merged folder is a complete model whose every weight could have been tuned: what a `full` run saves.
MERGED_METHOD = "full"

# "published": the model family's own layout (ChatGLM's code and tokenizer); "transformers": a folder
# transformers opens with its own classes, no trust_remote_code (ChatGLM2/3 and GLM-4 as GlmForCausalLM).
MergeFormat = Literal["published", "transformers"]
MERGE_FORMATS: tuple[str, ...] = ("published", "transformers")


class MergeError(ConfigError):
    """The adapter cannot be merged into this base model as loaded, or not into that folder."""


def check_merge_target(out: str | os.PathLike) -> None:
    """OUT must be a new or empty folder: merging never mixes its files with what is there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MergeError(f"--merge {out}: a file; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"--merge {out}: folder exists and is not empty; choose a new folder")


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the int8/int4 linears in `model` (the adapter cannot be added to packed integer weights)."""

    return [name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]


def merge_adapter(model: nn.Module) -> nn.Module:
    """The base model with the adapter's update added to its weights (PEFT's merge_and_unload)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise MergeError(f"expected a PEFT model (base + adapter) to merge, got {type(model).__name__}")
    quantized = quantized_layers(model)
    if quantized:
        bits = getattr(model.get_base_model().config, "quantization_bit", None)
        raise MergeError(
            f"the base model is quantized (model.quantization_bit {bits}; e.g. {quantized[0]}): an adapter "
            "cannot be merged into int8/int4 weights. Merge into the unquantized weights instead "
            "(model.quantization_bit 0, e.g. `--model.quantization_bit 0`), then quantize the merged model when "
            "you load it."
        )
    family = model_family(model)
    merged = model.merge_and_unload()
    merged.glmtune_family = family
    return merged


def merged_run_config(run_config: dict[str, Any], out: Path) -> dict[str, Any]:
    """The adapter's run config, now describing a self-contained model folder (method "full", no tiny build)."""
    config = {**run_config, "method": MERGED_METHOD}
    config["model"] = {**run_config.get("model", {}), "path": str(out), "tiny": None, "quantization_bit": 0}
    return config


def merge_and_save(
    engine: ChatEngine,
    out: str | os.PathLike,
    run_config: dict[str, Any] | None = None,
    merge_format: MergeFormat = "published",
) -> Path:
    """Merge `engine.model`'s adapter and write OUT: weights + config, tokenizer, hyperparameters.yaml.

    "published": ChatGLM models in their published layout (glmtune.models.saving.save_model), other models
    with transformers' save_pretrained. "transformers": ChatGLM2/3 and GLM-4 as transformers' own
    `GlmForCausalLM` with a fast tokenizer and the template's chat_template (see transformers_export.py);
    other transformers models as "published" does. `run_config` is the adapter's hyperparameters.yaml (as a
    dict); it is written back with model.path = OUT and method "full". The engine's model is merged in place:
    do not use it as base + adapter afterwards.
    """

    out = Path(out)
    if merge_format not in MERGE_FORMATS:
        raise MergeError(f"--merge_format {merge_format!r}: choose one of {', '.join(MERGE_FORMATS)}")
    if run_config is not None and not tuning_method(run_config.get("method"), HPARAMS_FILE).mergeable:
        raise MergeError(f"a {run_config['method']} result has no adapter to merge into its base weights")
    check_merge_target(out)
    family = model_family(engine.model)
    native = merge_format == "transformers" and family != "hf"
    if native:
        check_exportable(family, template_name(engine.template))
    merged = merge_adapter(engine.model)
    if native:
        save_transformers(merged, engine.tokenizer, engine.template, out, family)
    else:
        save_model(merged, out)
        engine.tokenizer.save_pretrained(str(out))
    if run_config is not None:
        config = merged_run_config(run_config, out)
        (out / HPARAMS_FILE).write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    engine.model = merged
    return out
