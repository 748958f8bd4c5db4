"""Load and save checkpoints: published ChatGLM folders without trust_remote_code, anything else via transformers.

Memory: a ChatGLM model is built with its parameters on the meta device (no storage, no init), then every
checkpoint tensor is read into memory of its own, in the target dtype (or quantized), and put in place,
one tensor at a time. Safetensors files are read with plain file reads, not memory-mapped, converting
through a small staging buffer; `.bin` shards are read one at a time. Loading peaks at about one copy of
the weights, plus one shard (`.bin`) when the dtype changes, plus one float weight when quantizing. The loaded weights never point into the checkpoint files, so the
folder a model came from can be overwritten by `save_model` while the model lives.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from glmtune.config import ConfigError
from glmtune.models.packing import accept_packed_batches

logger = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A checkpoint folder that cannot be loaded as asked (wrong family, truncated or foreign files, missing
    tensors): the user's to fix, so the scripts print it as an error line naming the file."""


Family = Literal["chatglm", "chatglm2", "chatglm3", "hf"]
CHATGLM_FAMILIES: tuple[str, ...] = ("chatglm", "chatglm2", "chatglm3")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Rotary inverse frequencies: both networks recompute them, and the published v1 ignores the stored copy.
ROTARY_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")

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

# (tensor name, dtype stored in the checkpoint) -> dtype to load it in
DtypeFor = Callable[[str, torch.dtype], torch.dtype]
# Conversion while reading safetensors goes through a buffer of this size, not a full-size copy.
STAGING_BYTES = 16 * 1024**2

# What save_model writes (and removes when a new save has another shard count).
SAVED_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")

# https://github.com/huggingface/safetensors: the format's dtype names.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_config(path: str | os.PathLike) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint folder {path}")
    return json.loads(config_file.read_text(encoding="utf-8"))


def _has_role_tokens(folder: Path) -> bool:
    """ChatGLM3's tokenizer files name its role tokens; ChatGLM2's (same tokenizer.model) do not."""
    for name in ("tokenizer_config.json", "tokenization_chatglm.py", "special_tokens_map.json"):
        file = folder / name
        if file.is_file() and "<|user|>" in file.read_text(encoding="utf-8", errors="replace"):
            return True
    return False


def detect_family(path: str | os.PathLike, config: dict | None = None) -> Family:
    """ChatGLM-6B, ChatGLM2 or ChatGLM3 from the published config (and files), else "hf".

    ChatGLM-6B has its own config schema (`position_encoding_2d`, `inner_hidden_size`). ChatGLM2 and ChatGLM3
    share the network and config schema; they differ only in the chat format, which the published configs do
    not record. We look at an explicit `glmtune_family` key (written by `save_model`), then the tokenizer
    files (ChatGLM3's name its role tokens), then `_name_or_path` and the folder name, in that order.
    """
    folder = Path(path)
    config = config if config is not None else read_config(folder)
    if config.get("model_type") != "chatglm":
        return "hf"
    if "position_encoding_2d" in config or "inner_hidden_size" in config:
        return "chatglm"
    family = config.get("glmtune_family")
    if family is not None:
        if family not in ("chatglm2", "chatglm3"):
            raise CheckpointError(
                f"{folder / 'config.json'}: glmtune_family {family!r} does not fit a ChatGLM2/3 config "
                "(expected 'chatglm2' or 'chatglm3')"
            )
        return family
    if _has_role_tokens(folder):
        return "chatglm3"
    names = f"{config.get('_name_or_path', '')} {folder.resolve().name}".lower()
    if "chatglm3" in names:
        return "chatglm3"
    return "chatglm2"


def _model_classes(family: str) -> tuple[type, type]:
    if family == "chatglm":
        from glmtune.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

        return ChatGLMConfig, ChatGLMForConditionalGeneration
    from glmtune.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration

    return ChatGLM2Config, ChatGLM2ForConditionalGeneration


# ---------------------------------------------------------------------------------------------------------
# Reading checkpoint files
# ---------------------------------------------------------------------------------------------------------


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a folder, in the order transformers picks them: safetensors before pickles."""
    folder = Path(path)
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{single}.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [folder / name for name in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{index} names shards that are not there: {absent}")
            return files
        if (folder / single).is_file():
            return [folder / single]
    # Shards without an index (hand-made folders): all of one kind, by name.
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(
            f"no weights in {folder}: expected model*.safetensors or pytorch_model*.bin (with an index if sharded)"
        )
    return files


def _read_exact(f, buffer: memoryview, what: str) -> None:
    # A single read() returns at most ~2 GiB on Linux: loop.
    done = 0
    while done < len(buffer):
        n = f.readinto(buffer[done:])
        if not n:
            raise CheckpointError(f"{what}: file ends {len(buffer) - done} bytes early (truncated download?)")
        done += n


def read_safetensors(
    file: str | os.PathLike, dtype_for: DtypeFor | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a safetensors file, each tensor read with plain file reads into its own memory.

    `dtype_for(name, stored_dtype)` picks the dtype a tensor is returned in (default: as stored); a
    conversion goes through a small staging buffer, so no second full-size tensor is ever allocated.

    Why not `safetensors.safe_open`: its tensors are views of a memory map of the whole file. Copying them
    out (to change dtype, or to not depend on the file) leaves every page read resident until the file is
    closed, so a single-file checkpoint would peak at the model plus the whole file. The format is an 8-byte
    little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw
    little-endian data.
    """
    file = Path(file)
    with open(file, "rb", buffering=0) as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        # In file order, so the reads are sequential.
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
            stored = SAFETENSORS_DTYPES[info["dtype"]]
            dtype = dtype_for(name, stored) if dtype_for is not None else stored
            tensor = torch.empty(info["shape"], dtype=dtype)
            begin, end = info["data_offsets"]
            nbytes = tensor.numel() * stored.itemsize
            if end - begin != nbytes:
                raise CheckpointError(
                    f"{file}: tensor {name!r} {info['dtype']}{info['shape']} needs {nbytes} bytes, "
                    f"its data_offsets span {end - begin}"
                )
            f.seek(data_start + begin)
            what = f"{file}: tensor {name!r}"
            flat = tensor.reshape(-1)
            if dtype == stored:
                if nbytes:
                    _read_exact(f, memoryview(flat.view(torch.uint8).numpy()), what)
            else:
                staging = torch.empty(
                    max(1, min(flat.numel(), STAGING_BYTES // stored.itemsize)), dtype=stored
                )
                for start in range(0, flat.numel(), staging.numel()):
                    chunk = staging[: min(staging.numel(), flat.numel() - start)]
                    _read_exact(f, memoryview(chunk.view(torch.uint8).numpy()), what)
                    flat[start : start + chunk.numel()].copy_(chunk)
            yield name, tensor


def iter_checkpoint_tensors(
    path: str | os.PathLike, dtype_for: DtypeFor | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a checkpoint folder, in `dtype_for(name, stored_dtype)` (default:
    as stored); each tensor owns its memory (CPU).

    A `.bin` shard is a pickle: torch.load reads it whole, so one shard is in memory at a time, and its
    tensors are handed out (converted if asked) and dropped here as they go. Not memory-mapped: copying out
    of a map would keep the shard's pages resident on top of the copies.
    """
    for file in checkpoint_files(path):
        if file.suffix == ".safetensors":
            yield from read_safetensors(file, dtype_for)
            continue
        state = torch.load(file, map_location="cpu", weights_only=True)
        for name in list(state):
            tensor = state.pop(name)  # popped: freed as soon as the caller drops it
            yield name, tensor.to(dtype_for(name, tensor.dtype)) if dtype_for is not None else tensor


# ---------------------------------------------------------------------------------------------------------
# load_model
# ---------------------------------------------------------------------------------------------------------


def _resolve_dtype(torch_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None for "auto"/None (keep the checkpoint's), else a torch dtype."""
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype == "auto":
        return None
    if torch_dtype not in DTYPES:
        raise ValueError(f"torch_dtype {torch_dtype!r}: expected 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[torch_dtype]


def _checkpoint_dtype(path: Path, raw: dict) -> torch.dtype:
    name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    if name not in DTYPES:
        raise CheckpointError(f"{path / 'config.json'}: torch_dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


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
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a checkpoint folder: our own ChatGLM implementations, or transformers for other models.

    `torch_dtype` None / "auto" keeps the checkpoint's dtype (config `torch_dtype`). `quantization_bit` 8/4
    quantizes the block linears on load; a checkpoint that already holds packed weights (config
    `quantization_bit` set) loads as is. `pre_seq_len` adds a P-Tuning v2 prefix encoder (kept in fp32, as the
    published scripts keep it), filled from `ptuning_checkpoint` (a file, or a folder with pytorch_model.bin)
    if given, else freshly initialised. The model is returned in eval mode.
    """
    path = Path(path)
    raw = read_config(path)
    if family not in ("auto", None, *get_args(Family)):
        raise ValueError(f"family {family!r}: expected 'auto' or one of {get_args(Family)}")
    detected = detect_family(path, raw)
    fam = detected if family in ("auto", None) else family
    if fam in CHATGLM_FAMILIES and (fam == "chatglm") != (detected == "chatglm"):
        raise CheckpointError(f"family {fam!r} given, but {path / 'config.json'} is a {detected} config")
    dtype = _resolve_dtype(torch_dtype)
    if fam == "hf":
        if quantization_bit or pre_seq_len or ptuning_checkpoint:
            raise CheckpointError(
                f"{path}: quantization_bit, pre_seq_len and ptuning_checkpoint apply to ChatGLM checkpoints only"
            )
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or "auto", trust_remote_code=_allow_remote_code(path, trust_remote_code)
        )
        model.glmtune_family = "hf"
        accept_packed_batches(model)  # packed batches (seq_ids) keep their samples apart in attention
        return model.to(device) if device is not None else model
    return _load_chatglm(
        path,
        raw,
        fam,
        dtype=dtype or _checkpoint_dtype(path, raw),
        device=torch.device(device) if device is not None else torch.device("cpu"),
        quantization_bit=quantization_bit,
        pre_seq_len=pre_seq_len,
        prefix_projection=prefix_projection,
        ptuning_checkpoint=ptuning_checkpoint,
    )


def _load_chatglm(
    path: Path,
    raw: dict,
    family: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    quantization_bit: int,
    pre_seq_len: int | None,
    prefix_projection: bool,
    ptuning_checkpoint: str | os.PathLike | None,
) -> nn.Module:
    from accelerate import init_empty_weights

    from glmtune.models import quantization

    config_cls, model_cls = _model_classes(family)
    config = config_cls(**raw)
    config.glmtune_family = family
    if pre_seq_len is not None:
        config.pre_seq_len = pre_seq_len
        config.prefix_projection = prefix_projection
    if getattr(config, "quantization_embeddings", False):
        raise NotImplementedError(
            f"{path / 'config.json'}: quantization_embeddings (int4 embeddings) is not supported"
        )
    saved_bits = int(raw.get("quantization_bit") or 0)
    if quantization_bit and saved_bits and quantization_bit != saved_bits:
        raise CheckpointError(
            f"{path} holds {saved_bits}-bit weights (config.json quantization_bit); "
            f"cannot load them as {quantization_bit}-bit"
        )
    bits = quantization_bit or saved_bits
    config.quantization_bit = bits

    # Parameters on meta (no memory, no init); buffers (rotary tables, prefix ids) are built for real.
    with init_empty_weights(include_buffers=False):
        model = model_cls(config)
    if bits:
        quantization.quantize_model(model, bits, dtype=dtype)
    model.glmtune_family = family
    # Tied (ChatGLM-6B): lm_head IS word_embeddings, as in the published model, whatever the checkpoint's
    # separate lm_head.weight holds (transformers 4 tied after loading); tie_weights() below restores it.
    tied = (
        set(model.get_expanded_tied_weights_keys(all_submodels=True)) if config.tie_word_embeddings else set()
    )
    expected = dict(model.state_dict(keep_vars=True))

    def dtype_for(name: str, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point:
            return stored  # packed int8 weights
        if bits and quantization.is_quantizable_weight(name):
            return stored  # quantized in the checkpoint's own dtype, as published model.half().quantize(bits)
        # The prefix encoder stays fp32 (see _init_prefix_encoder); all else in the compute dtype.
        return torch.float32 if "prefix_encoder." in name else dtype

    seen: set[str] = set()
    for name, tensor in iter_checkpoint_tensors(path, dtype_for):
        if name.endswith(ROTARY_SUFFIXES) or name in tied:
            continue
        if name not in expected:
            if "prefix_encoder." in name:  # a P-Tuning v2 model loaded without pre_seq_len
                continue
            hint = (
                " (packed weights, but config.json has no quantization_bit)" if "weight_scale" in name else ""
            )
            raise CheckpointError(f"{path}: unexpected tensor {name!r} for a {family} model{hint}")
        if not bits and quantization.is_quantizable_weight(name) and not tensor.is_floating_point():
            raise CheckpointError(
                f"{path}: {name!r} holds packed {tensor.dtype} weights, but config.json has no quantization_bit"
            )
        if bits and quantization.is_quantizable_weight(name) and tensor.is_floating_point():
            qweight, scale = quantization.quantize_weight(tensor.to(device), bits)
            scale_name = name.removesuffix("weight") + "weight_scale"
            _assign(model, path, name, qweight, expected[name])
            _assign(model, path, scale_name, scale.to(dtype), expected[scale_name])
            seen.update((name, scale_name))
            continue
        _assign(model, path, name, tensor.to(device), expected[name])
        seen.add(name)
        del tensor  # before the next one is read
    missing = [
        k
        for k in expected
        if k not in seen and k not in tied and "prefix_encoder." not in k and not k.endswith(ROTARY_SUFFIXES)
    ]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if tied:
        model.tie_weights()
    if config.pre_seq_len is not None:
        _init_prefix_encoder(model, device, loaded=any("prefix_encoder." in k for k in seen))
        if ptuning_checkpoint is not None:
            load_prefix_encoder(model, ptuning_checkpoint)
    elif ptuning_checkpoint is not None:
        raise CheckpointError(
            "ptuning_checkpoint needs pre_seq_len (the prefix length the prefix was trained with)"
        )
    model.to(device)  # buffers (rotary tables, prefix ids) were built on the CPU
    model.eval()
    return model


def _assign(model: nn.Module, path: Path, name: str, value: torch.Tensor, target: torch.Tensor) -> None:
    """Put `value` in place of the (meta) parameter or buffer `name`, after checking its shape."""
    if value.shape != target.shape:
        raise ValueError(
            f"{path}: tensor {name!r} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)} "
            "(config.json sizes or quantization_bit do not match the weights)"
        )
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        requires_grad = module._parameters[leaf].requires_grad and value.is_floating_point()
        module._parameters[leaf] = nn.Parameter(value, requires_grad=requires_grad)
    else:
        module._buffers[leaf] = value


def _init_prefix_encoder(model: nn.Module, device: torch.device, loaded: bool) -> None:
    """Give the P-Tuning v2 prefix encoder real fp32 storage; fresh init unless the checkpoint filled it.

    fp32 whatever the model's dtype: the published P-Tuning scripts run `model.half()` and then
    `prefix_encoder.float()`. A fresh prefix starts from torch's default init, as published.
    """
    encoder = model.transformer.prefix_encoder
    for module in encoder.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                module.register_parameter(
                    name, nn.Parameter(torch.empty(param.shape, device=device), param.requires_grad)
                )
                loaded = False
    encoder.to(dtype=torch.float32)
    if not loaded:
        for module in encoder.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()


def load_prefix_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read P-Tuning v2 weights (`transformer.prefix_encoder.*`) from a file or a folder.

    A folder holds them as the published P-Tuning scripts save them (pytorch_model.bin), or as
    model.safetensors.
    """
    p = Path(path)
    if p.is_dir():
        candidates = [p / "pytorch_model.bin", p / "model.safetensors", *sorted(p.glob("*.bin"))]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no P-Tuning v2 weights (pytorch_model.bin or model.safetensors) in {p}")
        p = found
    if not p.is_file():
        raise FileNotFoundError(f"P-Tuning v2 checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        state = dict(read_safetensors(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if "prefix_encoder." in k}
    if not state:
        raise CheckpointError(f"{p} holds no transformer.prefix_encoder.* weights")
    return state


def load_prefix_encoder(model: nn.Module, ptuning_checkpoint: str | os.PathLike) -> None:
    """Fill the model's prefix encoder from a P-Tuning v2 checkpoint (file or folder)."""
    state = load_prefix_state(ptuning_checkpoint)
    own = {k.split("prefix_encoder.", 1)[1]: v for k, v in state.items()}
    encoder = model.transformer.prefix_encoder
    expected = encoder.state_dict()
    if set(own) != set(expected):
        raise CheckpointError(
            f"{ptuning_checkpoint}: prefix encoder weights {sorted(own)} do not fit the model's "
            f"{sorted(expected)} (check pre_seq_len / prefix_projection)"
        )
    for key, value in own.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{ptuning_checkpoint}: prefix_encoder.{key} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)} (check pre_seq_len / prefix_projection)"
            )
    encoder.load_state_dict(own)


def _allow_remote_code(path: Path, trust_remote_code: bool) -> bool:
    """Whether transformers may run the folder's own code; refused up front (not deep inside transformers)
    for a folder whose architecture exists only as shipped code."""
    raw = read_config(path) if (path / "config.json").is_file() else {}
    if not trust_remote_code and "auto_map" in raw:
        from transformers import CONFIG_MAPPING

        if raw.get("model_type") not in CONFIG_MAPPING:
            raise ConfigError(
                f"model.path: {path} defines its model type {raw.get('model_type')!r} in its own Python code "
                "(config.json auto_map), which transformers runs only with model.trust_remote_code: true; "
                "set it if you trust that code"
            )
    if trust_remote_code:
        logger.warning(
            "model.trust_remote_code is on: transformers runs the Python code shipped in %s with your "
            "permissions",
            path,
        )
    return trust_remote_code


def load_tokenizer(path: str | os.PathLike, family: str = "auto", trust_remote_code: bool = False):
    """The family's tokenizer for a ChatGLM folder, else transformers' AutoTokenizer.

    Tokenizers published without a pad token (LLaMA, Pythia / GPT-NeoX, ...) pad with their eos token (or
    unk): padded positions are masked out of attention and labelled -100, so which id fills them never
    reaches a loss or an answer, but batching needs one.
    """
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
    if fam != "hf":
        raise ValueError(f"family {fam!r}: expected 'auto' or one of {get_args(Family)}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(path), trust_remote_code=_allow_remote_code(path, trust_remote_code)
    )
    if tokenizer.pad_token is None:
        filler = tokenizer.eos_token or tokenizer.unk_token
        if filler is None:
            raise CheckpointError(f"{path}: the tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = filler
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# save_model
# ---------------------------------------------------------------------------------------------------------


def model_family(model: nn.Module) -> Family:
    """The family a model is saved as: from its class for our ChatGLM models (ChatGLM2 vs ChatGLM3 from
    `glmtune_family` on the model or its config), "hf" for anything else."""
    from glmtune.models.chatglm import ChatGLMForConditionalGeneration
    from glmtune.models.chatglm2 import ChatGLM2ForConditionalGeneration

    if isinstance(model, ChatGLMForConditionalGeneration):
        return "chatglm"
    if isinstance(model, ChatGLM2ForConditionalGeneration):
        declared = getattr(model, "glmtune_family", None) or getattr(model.config, "glmtune_family", None)
        return "chatglm3" if declared == "chatglm3" else "chatglm2"
    return "hf"


def save_model(model: nn.Module, folder: str | os.PathLike, *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write a model: ChatGLM in the published layout, anything else with transformers' save_pretrained.

    ChatGLM: config.json in the published schema (plus `glmtune_family`, so ChatGLM2 vs ChatGLM3 survives)
    and the weights under their published names as safetensors, in shards of at most `max_shard_bytes`
    (model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json). Tied tensors
    (ChatGLM-6B's lm_head and word_embeddings) are written separately, as in the published files. Shards
    are written one at a time; only tensors sharing memory with another are copied.
    """
    from safetensors.torch import save_file

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
    from transformers.utils.hub import convert_file_size_to_int

    save_model(model, save_directory, max_shard_bytes=convert_file_size_to_int(max_shard_size))
