"""Load a model or tokenizer: published ChatGLM folders with glmtune's own classes (no trust_remote_code),
anything else via transformers.

Memory: a ChatGLM model is built with its parameters on the meta device (no storage, no init), then every
checkpoint tensor is read (glmtune.models.reading) into memory of its own, in the target dtype (or quantized),
and put in place, one tensor at a time. Loading peaks at about one copy of the weights, plus one shard (`.bin`)
when the dtype changes, plus one float weight when quantizing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import get_args

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

from glmtune.config import ConfigError
from glmtune.models import quantization
from glmtune.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration
from glmtune.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmtune.models.families import CHATGLM_FAMILIES, Family, chat_family, detect_family, resolve_family
from glmtune.models.packing import accept_packed_batches
from glmtune.models.reading import CheckpointError, iter_checkpoint_tensors, load_prefix_state, read_config
from glmtune.tokenizers.chatglm import ChatGLMTokenizer
from glmtune.tokenizers.chatglm2 import ChatGLM2Tokenizer, ChatGLM3Tokenizer
from glmtune.tokenizers.glm4 import GLM4Tokenizer
from glmtune.tokenizers.glm4_fast import GLM4TokenizerFast

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Rotary inverse frequencies: both networks recompute them, and the published v1 ignores the stored copy.
ROTARY_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


def _model_classes(family: str) -> tuple[type, type]:
    if family == "chatglm":
        return ChatGLMConfig, ChatGLMForConditionalGeneration
    return ChatGLM2Config, ChatGLM2ForConditionalGeneration


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
    # ChatGLM-6B's network and GLM-4's vocabulary are their own; ChatGLM2 and ChatGLM3 only differ in chat format
    if fam in CHATGLM_FAMILIES and any((fam == f) != (detected == f) for f in ("chatglm", "glm4")):
        raise CheckpointError(f"family {fam!r} given, but {path / 'config.json'} is a {detected} config")
    dtype = _resolve_dtype(torch_dtype)
    if fam == "hf":
        if quantization_bit or pre_seq_len or ptuning_checkpoint:
            raise CheckpointError(
                f"{path}: quantization_bit, pre_seq_len and ptuning_checkpoint apply to ChatGLM checkpoints only"
            )
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
    """The family's tokenizer for a ChatGLM folder, else transformers' AutoTokenizer (for a transformers-native
    GLM folder with GLM-4's vocabulary, its tokenizer.json as `GLM4TokenizerFast`, which the glm4 templates use).

    Tokenizers published without a pad token (LLaMA, Pythia / GPT-NeoX, ...) pad with their eos token (or
    unk): padded positions are masked out of attention and labelled -100, so which id fills them never
    reaches a loss or an answer, but batching needs one.
    """
    path = Path(path)
    fam = resolve_family(path, family)
    if fam == "chatglm":
        return ChatGLMTokenizer.from_pretrained(str(path))
    if fam == "chatglm2":
        return ChatGLM2Tokenizer.from_pretrained(str(path))
    if fam == "chatglm3":
        return ChatGLM3Tokenizer.from_pretrained(str(path))
    if fam == "glm4":
        return GLM4Tokenizer.from_pretrained(str(path))
    if chat_family(path, fam) == "glm4":
        return GLM4TokenizerFast.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(
        str(path), trust_remote_code=_allow_remote_code(path, trust_remote_code)
    )
    if tokenizer.pad_token is None:
        filler = tokenizer.eos_token or tokenizer.unk_token
        if filler is None:
            raise CheckpointError(f"{path}: the tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = filler
    return tokenizer
