"""Write a ChatGLM2 / ChatGLM3 / GLM-4 model as a transformers-native `GlmForCausalLM` folder.

The three share one network (pre-norm RMSNorm blocks, grouped-query attention with a bias on q/k/v only,
SwiGLU, rotary on the first half of each head's channels in adjacent pairs with base 10000 × `rope_ratio`),
which is what transformers' `GlmForCausalLM` computes (`partial_rotary_factor` 0.5, interleaved rotary). So
the weights only change names: `query_key_value` is split into `q_proj` / `k_proj` / `v_proj`, and
`dense_h_to_4h` (gate then up, as SwiGLU chunks it) is `gate_up_proj`. The folder also gets a `tokenizer.json`
fast tokenizer (the SentencePiece model or the tiktoken ranks converted by transformers' converters, with
the family's special tokens and its `[gMASK] sop` prefix) and the family's `chat_template`, so that
`AutoModelForCausalLM` / `AutoTokenizer` open it with no `trust_remote_code`: what vLLM, SGLang, TGI and
llama.cpp's converter read. ChatGLM-6B (2D positions, a bidirectional prompt) has no such class.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, processors
from torch import nn
from transformers import GenerationConfig, GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

from glmtune.config import ConfigError
from glmtune.tokenizers.glm4 import PATTERN

# The ChatGLM2/3 network settings GlmForCausalLM assumes, and the value it needs for each.
REQUIRED_CONFIG: dict[str, Any] = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "add_bias_linear": False,
    "original_rope": True,
}

# ChatGLM3's published chat format (its tokenizer's `build_chat_input`): `<|role|>` + `metadata\n` + content,
# each piece encoded with SentencePiece's dummy prefix; the space after `\n` makes the text encode to exactly
# those ids (a dummy prefix before the content), tools appended to a system message as indented JSON. The
# newlines are written as expressions: chat templates drop a newline right after a block tag.
CHATGLM3_CHAT_TEMPLATE = (
    "[gMASK]sop{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['metadata'] is defined and message['metadata'] %}{{ message['metadata'] }}{% endif %}"
    "{{ '\\n ' }}{{ message['content'] }}{% if message['role'] == 'system' and message['tools'] is defined %}"
    "{{ '\\n' }}{{ message['tools'] | tojson(indent=4) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# ChatGLM2's published prompt (`[Round i]\n\n问：...\n\n答：`), a system message before the first query.
CHATGLM2_CHAT_TEMPLATE = (
    "[gMASK]sop{% set ns = namespace(system='', round=0) %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n' %}"
    "{% elif message['role'] == 'user' %}{% set ns.round = ns.round + 1 %}[Round {{ ns.round }}]\n\n问："
    "{% if ns.round == 1 %}{{ ns.system }}{% endif %}{{ message['content'] }}\n\n答："
    "{% else %}{{ message['content'] }}\n\n{% endif %}{% endfor %}"
)

# glmtune's chat templates a folder can carry, as chat_template text (None: the published GLM-4 tokenizer's).
CHAT_TEMPLATES: dict[str, str | None] = {
    "chatglm2": CHATGLM2_CHAT_TEMPLATE,
    "chatglm3": CHATGLM3_CHAT_TEMPLATE,
    "glm4": None,
    "glm4_per_message": None,
}


class ExportError(ConfigError):
    """The model cannot be written as a transformers-native folder."""


def glm_config(config: Any, dtype: torch.dtype) -> GlmConfig:
    """The `GlmConfig` of a ChatGLM2/3/GLM-4 config; refuses settings GlmForCausalLM does not compute."""
    for key, value in REQUIRED_CONFIG.items():
        if getattr(config, key, value) != value:
            raise ExportError(
                f"config {key}={getattr(config, key)!r}: transformers' GlmForCausalLM computes {key}={value!r} "
                "only; use --merge_format published"
            )
    if getattr(config, "pre_seq_len", None):
        raise ExportError("a P-Tuning v2 prefix has no place in GlmForCausalLM; use --merge_format published")
    heads = config.num_attention_heads
    head_dim = config.kv_channels or config.hidden_size // heads
    return GlmConfig(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=config.multi_query_group_num if config.multi_query_attention else heads,
        head_dim=head_dim,
        rms_norm_eps=config.layernorm_epsilon,
        max_position_embeddings=config.seq_length,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * getattr(config, "rope_ratio", 1.0),
            "partial_rotary_factor": 0.5,
        },
        attention_bias=config.add_qkv_bias,
        tie_word_embeddings=False,
        pad_token_id=config.pad_token_id,
        eos_token_id=config.eos_token_id,
        dtype=dtype,
        architectures=["GlmForCausalLM"],
    )


_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}


def glm_state_dict(state: dict[str, torch.Tensor], config: GlmConfig) -> dict[str, torch.Tensor]:
    """ChatGLM2/3/GLM-4 weights under GlmForCausalLM's names (q/k/v split out of query_key_value)."""
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue  # recomputed from the config
        layer = _LAYER.fullmatch(name)
        if name in _TOP:
            out[_TOP[name]] = tensor
        elif layer and layer.group(2) in _RENAMES:
            out[f"model.layers.{layer.group(1)}.{_RENAMES[layer.group(2)]}"] = tensor
        elif layer and layer.group(2).startswith("self_attention.query_key_value."):
            kind = layer.group(2).rsplit(".", 1)[1]
            q, k, v = tensor.split([q_size, kv_size, kv_size], dim=0)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"model.layers.{layer.group(1)}.self_attn.{proj}.{kind}"] = part.contiguous()
        else:
            raise ExportError(f"weight {name!r} has no place in GlmForCausalLM; use --merge_format published")
    return out


def _special_tokens(tokenizer: Any, family: str) -> list[tuple[str, int]]:
    """(token, id) of the family's special tokens, in id order."""
    if family == "glm4":
        return sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    return sorted(((t, tokenizer.get_command(t)) for t in tokenizer.command_tokens), key=lambda item: item[1])


def _backend_tokenizer(tokenizer: Any, family: str) -> Tokenizer:
    """The fast tokenizer of the model's vocabulary, encoding text as glmtune's tokenizer does."""
    if family == "glm4":
        from transformers.convert_slow_tokenizer import TikTokenConverter

        return TikTokenConverter(tokenizer.vocab_file, pattern=PATTERN).converted()
    from sentencepiece import sentencepiece_model_pb2
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer.vocab_file).read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    # legacy: every text between special tokens gets the dummy prefix, as ChatGLM encodes each piece
    return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)


def fast_tokenizer(tokenizer: Any, family: str, chat_template: str) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` for a ChatGLM2/3/GLM-4 tokenizer: same ids for text and chat prompts."""
    backend = _backend_tokenizer(tokenizer, family)
    specials = _special_tokens(tokenizer, family)
    for token, expected in specials:
        if backend.token_to_id(token) is not None and backend.token_to_id(token) != expected:
            raise ExportError(f"special token {token!r} is id {expected} but the vocabulary has it elsewhere")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in specials])
    for token, expected in specials:
        if backend.token_to_id(token) != expected:
            raise ExportError(f"special token {token!r}: id {expected} cannot follow the vocabulary")
    gmask, sop = ("[gMASK]", "<sop>") if family == "glm4" else ("[gMASK]", "sop")
    ids = {gmask: backend.token_to_id(gmask), sop: backend.token_to_id(sop)}
    backend.post_processor = processors.TemplateProcessing(
        single=f"{gmask} {sop} $A", pair=f"{gmask} {sop} $A $B", special_tokens=list(ids.items())
    )
    eos = tokenizer.eos_token
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token=tokenizer.pad_token or eos,
        unk_token=tokenizer.unk_token,
        padding_side="left",
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )


def check_exportable(family: str, template_name: str) -> None:
    """Refuse a model or prompt format a GlmForCausalLM folder cannot reproduce, before any work is done."""
    if family == "chatglm":
        raise ExportError(
            "--merge_format transformers: ChatGLM-6B has no transformers-native class (its 2D positions and "
            "bidirectional prompt attention are only in its own published code); use --merge_format published"
        )
    if family not in ("chatglm2", "chatglm3", "glm4"):
        raise ExportError(
            f"--merge_format transformers writes ChatGLM2/3 and GLM-4 models, not a {family} model"
        )
    if template_name not in CHAT_TEMPLATES:
        raise ExportError(
            f"--merge_format transformers: template {template_name!r} has no chat_template to export (the "
            f"exported folder prompts as one of {', '.join(CHAT_TEMPLATES)}); use --merge_format published"
        )


def save_transformers(
    model: nn.Module, tokenizer: Any, template: Any, out: str | os.PathLike, family: str
) -> Path:
    """Write `model` (a merged ChatGLM2/3/GLM-4) and its tokenizer as a GlmForCausalLM folder at `out`, with
    the chat_template of glmtune's `template` and its stop ids as the generation eos ids."""
    check_exportable(family, template.name)
    chat_template = CHAT_TEMPLATES[template.name] or tokenizer.chat_template
    stop_token_ids = list(template.stop_token_ids)
    state = model.state_dict()
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    config = glm_config(model.config, dtype)
    config.eos_token_id = stop_token_ids
    weights = glm_state_dict(state, config)
    with torch.device("meta"):
        native = GlmForCausalLM(config)
    native.load_state_dict(weights, strict=True, assign=True)
    out = Path(out)
    native.save_pretrained(out)
    GenerationConfig(eos_token_id=stop_token_ids, pad_token_id=config.pad_token_id).save_pretrained(out)
    fast_tokenizer(tokenizer, family, chat_template).save_pretrained(out)
    return out
