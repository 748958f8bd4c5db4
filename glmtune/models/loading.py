"""Load and save checkpoints: published ChatGLM folders without trust_remote_code, anything else via transformers.

ChatGLM weights are read one shard (one tensor, for safetensors) at a time straight into the target dtype,
into a model whose parameters were created on the meta device, so loading holds about one copy of the
weights. int8/int4 quantization happens tensor by tensor on the way in.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Family = Literal["chatglm", "chatglm2", "chatglm3", "hf"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Keys a state dict may lack: recomputed buffers and the P-Tuning v2 prefix encoder (loaded separately).
OPTIONAL_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


# transformers' bookkeeping keys that the published config.json files do not have.
GENERIC_CONFIG_KEYS = ("transformers_version", "glmtune_family", "_name_or_path", "dtype", "output_hidden_states",
                       "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
                       "problem_type", "output_attentions")


def _is_optional(key: str) -> bool:
    return key.endswith(OPTIONAL_SUFFIXES) or "prefix_encoder." in key


def read_config(path: str | os.PathLike) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint folder {path}")
    return json.loads(config_file.read_text(encoding="utf-8"))


def detect_family(path: str | os.PathLike, config: dict | None = None) -> Family:
    """ChatGLM-6B, ChatGLM2 or ChatGLM3 from the published config (and names), else "hf".

    ChatGLM2 and ChatGLM3 share the network and config schema; they differ only in the chat format, which
    the published configs do not record. We look at an explicit `glmtune_family` key (written by our
    save), the `_name_or_path`, the folder name, and the tokenizer config's role tokens, in that order.
    """
    config = config if config is not None else read_config(path)
    if config.get("model_type") != "chatglm":
        return "hf"
    if "position_encoding_2d" in config or "inner_hidden_size" in config:
        return "chatglm"
    family = config.get("glmtune_family")
    if family in ("chatglm2", "chatglm3"):
        return family
    names = f"{config.get('_name_or_path', '')} {Path(path).resolve().name}".lower()
    if "chatglm3" in names:
        return "chatglm3"
    if "chatglm2" in names:
        return "chatglm2"
    tokenizer_config = Path(path) / "tokenizer_config.json"
    if tokenizer_config.is_file() and "<|user|>" in tokenizer_config.read_text(encoding="utf-8"):
        return "chatglm3"
    return "chatglm2"


def _model_classes(family: Family):
    if family == "chatglm":
        from glmtune.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

        return ChatGLMConfig, ChatGLMForConditionalGeneration
    from glmtune.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration

    return ChatGLM2Config, ChatGLM2ForConditionalGeneration


def iter_checkpoint_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from safetensors (sharded or not) or pytorch_model*.bin shards, one shard at a time."""
    folder = Path(path)
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        from safetensors import safe_open

        for file in safetensors:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, f.get_tensor(name)
        return
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = [p.name for p in sorted(folder.glob("pytorch_model*.bin"))]
    if not shards:
        raise FileNotFoundError(f"no weights (*.safetensors or pytorch_model*.bin) in {folder}")
    for shard in shards:
        state = torch.load(folder / shard, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()
        del state
        gc.collect()


def _materialize(model: nn.Module, device: torch.device | str) -> None:
    """Give parameters still on the meta device (absent from the checkpoint) real, zeroed storage."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                module.register_parameter(
                    name, nn.Parameter(torch.zeros_like(param, device=device), param.requires_grad)
                )


def load_model(
    path: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    quantization_bit: int = 0,
    pre_seq_len: int | None = None,
    prefix_projection: bool = False,
    ptuning_checkpoint: str | os.PathLike | None = None,
    family: str = "auto",
) -> nn.Module:
    """Load a checkpoint folder: our own ChatGLM implementations, or transformers for other models.

    `torch_dtype` None keeps the checkpoint's dtype (config `torch_dtype`), `quantization_bit` 8/4 quantizes
    the block linears on load (a checkpoint already holding packed weights loads as is), `pre_seq_len` adds
    a P-Tuning v2 prefix encoder, filled from `ptuning_checkpoint` if given.
    """
    path = Path(path)
    raw = read_config(path)
    fam = detect_family(path, raw) if family in (None, "auto") else family
    dtype = DTYPES[torch_dtype] if isinstance(torch_dtype, str) and torch_dtype != "auto" else torch_dtype
    if fam == "hf":
        if quantization_bit or pre_seq_len:
            raise ValueError("quantization_bit and pre_seq_len apply to ChatGLM checkpoints only")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", low_cpu_mem_usage=True)
        model.glmtune_family = "hf"
        return model.to(device) if device is not None else model

    from accelerate import init_empty_weights

    from glmtune.models import quantization

    config_cls, model_cls = _model_classes(fam)
    config = config_cls(**raw)
    if dtype is None:
        dtype = DTYPES.get(str(raw.get("torch_dtype", "float32")), torch.float32)
    if pre_seq_len is not None:
        config.pre_seq_len = pre_seq_len
        config.prefix_projection = prefix_projection
    bits = quantization_bit or int(raw.get("quantization_bit", 0) or 0)
    config.quantization_bit = bits
    device = torch.device(device) if device is not None else torch.device("cpu")

    # Parameters on meta (no memory, no init); buffers (rotary tables, prefix ids) are built for real.
    with init_empty_weights(include_buffers=False):
        model = model_cls(config)
    if bits:
        quantization.quantize_model(model, bits, dtype=dtype)
    model.glmtune_family = fam
    expected = dict(model.state_dict(keep_vars=True))
    packed_on_disk = None
    seen: set[str] = set()
    for name, tensor in iter_checkpoint_tensors(path):
        if name not in expected:
            if _is_optional(name):
                continue
            raise KeyError(f"{path}: unexpected tensor {name!r} for a {fam} model")
        if bits and quantization.is_quantizable_weight(name):
            if packed_on_disk is None:
                packed_on_disk = tensor.dtype == torch.int8
            if not packed_on_disk:
                # In the checkpoint's own dtype, as the published model.half().quantize(bits) does.
                q, scale = quantization.quantize_weight(tensor.to(device=device), bits)
                _assign(model, name, q)
                _assign(model, name.removesuffix("weight") + "weight_scale", scale.to(dtype))
                seen.update((name, name.removesuffix("weight") + "weight_scale"))
                continue
        target = expected[name]
        # Floating weights go to the compute dtype; packed ints and rotary tables keep their own.
        keep_dtype = not tensor.dtype.is_floating_point or name.endswith("inv_freq")
        value = tensor.to(device=device, dtype=target.dtype if keep_dtype else dtype)
        _assign(model, name, value)
        seen.add(name)
    missing = [k for k in expected if k not in seen and not _is_optional(k)]
    if missing:
        raise KeyError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    _materialize(model, device)
    model.to(device)
    # Buffers and the prefix encoder follow the compute dtype; inv_freq keeps its own precision.
    for mod_name, module in model.named_modules():
        if mod_name.endswith("prefix_encoder"):
            module.to(dtype=torch.float32 if dtype != torch.float32 else dtype)
    if config.pre_seq_len:
        _init_or_load_prefix(model, ptuning_checkpoint)
    model.eval()
    return model


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        requires_grad = old.requires_grad and value.dtype.is_floating_point
        module._parameters[leaf] = nn.Parameter(value, requires_grad=requires_grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise KeyError(name)


def load_prefix_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read P-Tuning v2 weights from a file or a folder (pytorch_model.bin / model.safetensors / *.bin)."""
    p = Path(path)
    if p.is_dir():
        candidates = [p / "model.safetensors", p / "pytorch_model.bin", *sorted(p.glob("*.bin"))]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no P-Tuning v2 weights in {p}")
        p = found
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if "prefix_encoder." in k}
    if not state:
        raise KeyError(f"{p} holds no transformer.prefix_encoder.* weights")
    return state


def _init_or_load_prefix(model: nn.Module, ptuning_checkpoint: str | os.PathLike | None) -> None:
    encoder = model.transformer.prefix_encoder
    if ptuning_checkpoint is None:
        # Fresh prefix: the published scripts start from nn.Embedding/Linear's default init.
        for module in encoder.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return
    state = load_prefix_state(ptuning_checkpoint)
    own = {k.split("prefix_encoder.", 1)[1]: v for k, v in state.items()}
    param = next(encoder.parameters())
    encoder.load_state_dict({k: v.to(param.dtype) for k, v in own.items()})


def load_tokenizer(path: str | os.PathLike, family: str = "auto"):
    """The family's tokenizer for a ChatGLM folder, else transformers' AutoTokenizer."""
    path = Path(path)
    fam = detect_family(path) if family in (None, "auto") else family
    if fam == "chatglm":
        from glmtune.tokenizers.chatglm import ChatGLMTokenizer

        return ChatGLMTokenizer.from_pretrained(str(path))
    if fam == "chatglm2":
        from glmtune.tokenizers.chatglm2 import ChatGLM2Tokenizer

        return ChatGLM2Tokenizer.from_pretrained(str(path))
    if fam == "chatglm3":
        from glmtune.tokenizers.chatglm2 import ChatGLM3Tokenizer

        return ChatGLM3Tokenizer.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def save_model(model: nn.Module, folder: str | os.PathLike, *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write a ChatGLM model in the published layout (config.json + safetensors shards + index)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    family = getattr(model, "glmtune_family", "hf")
    if family == "hf":
        model.save_pretrained(folder)
        return folder
    config = model.config.to_dict()
    for key in GENERIC_CONFIG_KEYS:
        config.pop(key, None)
    config["glmtune_family"] = family
    config["architectures"] = ["ChatGLMModel"]
    # Separate, contiguous tensors: the published v1 files store lm_head and embeddings apart.
    state = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in model.state_dict().items()
        if not k.endswith("prefix_tokens")
    }
    first = next((v for v in state.values() if v.dtype.is_floating_point), None)
    if first is not None:
        config["torch_dtype"] = str(first.dtype).removeprefix("torch.")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
        )
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return folder
