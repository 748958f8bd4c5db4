"""Writing a model: ChatGLM in the published checkpoint layout, anything else with transformers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors.torch import save_file
from torch import nn
from transformers.utils.hub import convert_file_size_to_int

from glmtune.models.families import model_family

# transformers' bookkeeping keys that the published config.json files do not have.
GENERIC_CONFIG_KEYS = (
    "transformers_version",
    "glmtune_family",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "output_attentions",
)

# What save_model writes (and removes when a new save has another shard count).
SAVED_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def save_model(model: nn.Module, folder: str | os.PathLike, *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write a model: ChatGLM in the published layout, anything else with transformers' save_pretrained.

    ChatGLM: config.json in the published schema (plus `glmtune_family`, so ChatGLM2 vs ChatGLM3 survives)
    and the weights under their published names as safetensors, in shards of at most `max_shard_bytes`
    (model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json). Tied tensors
    (ChatGLM-6B's lm_head and word_embeddings) are written separately, as in the published files. Shards
    are written one at a time; only tensors sharing memory with another are copied.
    """
    folder = Path(folder)
    family = model_family(model)
    if family == "hf":
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        return folder

    config = model.config.to_dict()
    for key in GENERIC_CONFIG_KEYS:
        config.pop(key, None)
    config["glmtune_family"] = family
    config["architectures"] = ["ChatGLMModel"]
    state = model.state_dict()
    floating = next((v for v in state.values() if v.is_floating_point()), None)
    if floating is not None:
        config["torch_dtype"] = str(floating.dtype).removeprefix("torch.")

    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )

    folder.mkdir(parents=True, exist_ok=True)
    written: set[int] = set()  # storages already written: a second tensor on one (tied) is copied
    for file, shard in zip(names, shards):
        tensors = {}
        for name in shard:
            tensor = state[name].detach().to("cpu").contiguous()
            storage = tensor.untyped_storage().data_ptr()
            tensors[name] = tensor.clone() if storage in written else tensor
            written.add(storage)
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    for stale in folder.iterdir():
        # Weights of an earlier save with another shard count would be read instead of (or with) these.
        if SAVED_WEIGHTS.fullmatch(stale.name) and stale.name not in names:
            stale.unlink()
    if len(shards) > 1:
        weight_map = {name: file for file, shard in zip(names, shards) for name in shard}
        total = sum(t.numel() * t.element_size() for t in state.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return folder


def save_pretrained_published(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    is_main_process: bool = True,
    max_shard_size: int | str = "2GB",
    safe_serialization: bool = True,
    **unsupported: object,
) -> None:
    """`save_pretrained` of our ChatGLM classes: transformers' signature, the published layout (save_model)."""
    if unsupported:
        raise TypeError(f"save_pretrained of a ChatGLM model does not take {sorted(unsupported)}")
    if not safe_serialization:
        raise ValueError("ChatGLM models are saved as safetensors only (safe_serialization=False given)")
    if not is_main_process:
        return
    save_model(model, save_directory, max_shard_bytes=convert_file_size_to_int(max_shard_size))
