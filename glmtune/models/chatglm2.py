"""ChatGLM2-6B / ChatGLM3-6B: one network, parameter names equal to the published checkpoints.

Re-implementation of THUDM's `modeling_chatglm.py` (chatglm2-6b, chatglm3-6b) for transformers 5: the
KV cache is a `DynamicCache`, `generate()` is transformers' own, and P-Tuning v2 prefixes are prepended
inside attention instead of living in the cache. Tensors are batch-first ([b, s, h]); the published code
is sequence-first, which changes nothing numerically.

The network: token embedding -> N x GLMBlock (pre-norm, RMSNorm, multi-query attention with rotary
embedding on half of each head, SwiGLU MLP) -> final RMSNorm -> output_layer (untied).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from glmtune.models.lean_ops import rms_norm, swiglu
from glmtune.models.packing import (
    PackedSpans,
    block_causal_mask,
    flash_varlen_available,
    positions_in_samples,
    refuse_cache,
)
from glmtune.models.saving import save_pretrained_published


class ChatGLM2Config(PretrainedConfig):
    """The published ChatGLM2/3 `config.json` schema and defaults (THUDM `configuration_chatglm.py`).

    `vocab_size` and `num_hidden_layers` are aliases of `padded_vocab_size` and `num_layers`, so that
    transformers' generic code (DynamicCache, resize_token_embeddings) works and `to_dict()` still writes
    only the published key names.
    """

    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers", "vocab_size": "padded_vocab_size"}

    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int | None = 128
    num_attention_heads: int = 32
    seq_length: int = 2048
    hidden_dropout: float = 0.0
    classifier_dropout: float | None = None
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    bias_dropout_fusion: bool = True
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    # ChatGLM3's long-context releases scale the rotary base: base = 10000 * rope_ratio. (ChatGLM2-6B-32k
    # divided the positions by it instead; its config cannot be told apart, so that variant is not covered.)
    rope_ratio: float = 1.0
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    fp32_residual_connection: bool = False
    original_rope: bool = True
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0

    @property
    def head_dim(self) -> int:
        return (
            self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads
        )

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: the multi-query groups, or one per attention head."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.eps)  # keeps no fp32 copy for the backward


def _norm(config: ChatGLM2Config) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for `dim` rotated channels (= half of a head), looked up by position id.

    `inv_freq` is kept (persistent) only because the published checkpoints hold it; like the published
    code, the angles are recomputed in fp32 from the base, so the checkpoint's fp16 copy does not matter.
    """

    def __init__(self, dim: int, rope_ratio: float = 1.0) -> None:
        super().__init__()
        self.dim = dim
        self.rope_ratio = rope_ratio
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=True)
        # A state dict without inv_freq (it is derived data) still loads with strict=True.
        self._register_load_state_dict_pre_hook(self._fill_missing_inv_freq)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        base = 10000 * self.rope_ratio
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim))

    def _fill_missing_inv_freq(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        if prefix + "inv_freq" not in state_dict:
            state_dict[prefix + "inv_freq"] = self.compute_inv_freq().to(self.inv_freq.dtype)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """position_ids [b, s] -> rope cache [b, s, dim // 2, 2] holding (cos, sin) of position * theta_i."""
        theta = self.compute_inv_freq(device=position_ids.device)
        angles = position_ids[..., None].float() * theta
        cache = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        # The published code rounds the table to the half dtype the model runs in (mimics complex32).
        if dtype in (torch.float16, torch.bfloat16):
            cache = cache.to(dtype)
        return cache


def apply_rotary_pos_emb(x: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2 * rope_cache.shape[-2] channels of each head in ADJACENT pairs (x0, x1).

    x: [b, heads, s, head_dim]; rope_cache: [b, s, rot_dim // 2, 2]. The other channels pass through.
    """
    rot_dim = rope_cache.shape[-2] * 2
    x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    pairs = x.reshape(*x.shape[:-1], rot_dim // 2, 2)
    rope = rope_cache.unsqueeze(1)  # broadcast over heads
    cos, sin = rope[..., 0], rope[..., 1]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x_pass], dim=-1)


class SelfAttention(nn.Module):
    """Multi-query attention: `heads` query heads share `multi_query_group_num` key/value heads."""

    def __init__(self, config: ChatGLM2Config, layer_number: int) -> None:
        super().__init__()
        self.layer_number = max(1, layer_number)
        self.layer_idx = layer_number - 1  # index into the KV cache
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.num_kv_heads = config.num_kv_heads
        self.multi_query_attention = config.multi_query_attention
        self.attention_dropout = config.attention_dropout
        self.projection_size = self.num_heads * self.head_dim
        qkv_size = self.projection_size + 2 * self.num_kv_heads * self.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(self.projection_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | PackedSpans | None,
        rotary_pos_emb: torch.Tensor,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        mixed = self.query_key_value(hidden_states)
        if self.multi_query_attention:
            # [q of all heads | k of all groups | v of all groups]
            kv_size = self.num_kv_heads * self.head_dim
            query, key, value = mixed.split([self.projection_size, kv_size, kv_size], dim=-1)
            query = query.view(batch, seq_len, self.num_heads, self.head_dim)
            key = key.view(batch, seq_len, self.num_kv_heads, self.head_dim)
            value = value.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        else:
            # Published layout without multi-query: per head [q_h | k_h | v_h].
            mixed = mixed.view(batch, seq_len, self.num_heads, 3 * self.head_dim)
            query, key, value = mixed.split(self.head_dim, dim=-1)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [b, heads, s, head_dim]

        query = apply_rotary_pos_emb(query, rotary_pos_emb)
        key = apply_rotary_pos_emb(key, rotary_pos_emb)
        if isinstance(attention_mask, PackedSpans):
            # A packed batch on CUDA: FlashAttention's varlen kernel in half precision, else the block mask.
            if query.dtype in (torch.float16, torch.bfloat16):
                dropout = self.attention_dropout if self.training else 0.0
                context = attention_mask.attend(query, key, value, dropout)
                return self.dense(context.transpose(1, 2).reshape(batch, seq_len, self.projection_size))
            attention_mask = block_causal_mask(attention_mask.seq_ids)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if prefix_key is not None:
            # P-Tuning v2: learned (un-rotated) keys/values in front of the real tokens, never cached.
            key = torch.cat([prefix_key.to(key.dtype), key], dim=2)
            value = torch.cat([prefix_value.to(value.dtype), value], dim=2)
        # Head h reads group h // (heads / groups). Flash attention (half precision, no mask) does that itself,
        # reading the groups in place: no copies of K and V per head, in memory and in the backward. The CUDA
        # kernels that take a mask or fp32 do not, and SDPA would fall back to its slow math path.
        grouped = (
            self.num_kv_heads != self.num_heads
            and attention_mask is None
            and (query.device.type != "cuda" or query.dtype in (torch.float16, torch.bfloat16))
        )
        if self.num_kv_heads != self.num_heads and not grouped:
            repeats = self.num_heads // self.num_kv_heads
            key = key.repeat_interleave(repeats, dim=1)
            value = value.repeat_interleave(repeats, dim=1)

        # A Python bool, by branching: under torch.compile with a dynamic sequence length the comparison is
        # symbolic, and SDPA, which takes no symbolic bool, would break the compiled block in two.
        causal = True if attention_mask is None and seq_len == key.shape[2] and seq_len > 1 else False
        # Scale 1/sqrt(head_dim) (SDPA's default). apply_query_key_layer_scaling divides by layer_number and
        # multiplies back before the fp32 softmax in the published eager path: a no-op in exact arithmetic.
        context = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=causal,
            enable_gqa=grouped,
        )
        context = context.transpose(1, 2).reshape(batch, seq_len, self.projection_size)
        return self.dense(context)


class MLP(nn.Module):
    """h -> 2 * ffn (SwiGLU: silu(first half) * second half) -> h."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(
            config.hidden_size, config.ffn_hidden_size * 2, bias=config.add_bias_linear
        )
        self.dense_4h_to_h = nn.Linear(
            config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(swiglu(self.dense_h_to_4h(hidden_states)))


class GLMBlock(nn.Module):
    """Pre-norm transformer layer: x + Attn(Norm(x)), then x + MLP(Norm(x))."""

    def __init__(self, config: ChatGLM2Config, layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.apply_residual_connection_post_layernorm = config.apply_residual_connection_post_layernorm
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = _norm(config)
        self.self_attention = SelfAttention(config, layer_number)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | PackedSpans | None,
        rotary_pos_emb: torch.Tensor,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        layernorm_output = self.input_layernorm(hidden_states)
        attention_output = self.self_attention(
            layernorm_output, attention_mask, rotary_pos_emb, prefix_key, prefix_value, cache
        )
        # Residual from the normalized input when apply_residual_connection_post_layernorm (off in releases).
        residual = layernorm_output if self.apply_residual_connection_post_layernorm else hidden_states
        layernorm_input = residual + F.dropout(
            attention_output, p=self.hidden_dropout, training=self.training
        )

        layernorm_output = self.post_attention_layernorm(layernorm_input)
        mlp_output = self.mlp(layernorm_output)
        residual = layernorm_output if self.apply_residual_connection_post_layernorm else layernorm_input
        return residual + F.dropout(mlp_output, p=self.hidden_dropout, training=self.training)


class GLMTransformer(nn.Module):
    """The stack of GLMBlocks and the final norm (`transformer.encoder`)."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.num_layers = config.num_layers
        self.layers = nn.ModuleList([GLMBlock(config, i + 1) for i in range(config.num_layers)])
        if config.post_layer_norm:
            self.final_layernorm = _norm(config)
        self.post_layer_norm = config.post_layer_norm
        self.gradient_checkpointing = False
        # Selective checkpointing: with gradient checkpointing on, recompute only the first N blocks
        # (None = all). Fewer recomputed blocks trade memory for ~1/3 less compute in each of them.
        self.checkpoint_layers: int | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | PackedSpans | None,
        rotary_pos_emb: torch.Tensor,
        prefix_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        cache: Cache | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        all_hidden_states: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            if all_hidden_states is not None:
                all_hidden_states += (hidden_states,)
            prefix_key, prefix_value = prefix_key_values[index] if prefix_key_values else (None, None)
            if checkpointing and (self.checkpoint_layers is None or index < self.checkpoint_layers):
                # Tensors positionally, so that reentrant checkpointing also propagates their gradients; the
                # block itself, not a bound method, so that glmtune.training.compile can compile the
                # recomputation and the block together through this call.
                hidden_states = self._gradient_checkpointing_func(
                    layer,
                    hidden_states,
                    attention_mask,
                    rotary_pos_emb,
                    prefix_key,
                    prefix_value,
                    None,
                )
            else:
                hidden_states = layer(
                    hidden_states, attention_mask, rotary_pos_emb, prefix_key, prefix_value, cache
                )
        if self.post_layer_norm:
            hidden_states = self.final_layernorm(hidden_states)
        # The last entry is the final, normed output (the one the head reads), as in every transformers 5
        # language model; the published code appended it before the norm.
        if all_hidden_states is not None:
            all_hidden_states += (hidden_states,)
        return hidden_states, all_hidden_states


class Embedding(nn.Module):
    """Token embedding (`transformer.embedding.word_embeddings`)."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.fp32_residual_connection = config.fp32_residual_connection

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids)
        return embeddings.float() if self.fp32_residual_connection else embeddings


class PrefixEncoder(nn.Module):
    """P-Tuning v2 prefix: [b, pre_seq_len] ids -> [b, pre_seq_len, num_layers * 2 * groups * kv_channels].

    With `prefix_projection`, an embedding of the same width goes through Linear-Tanh-Linear (`trans`).
    """

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.prefix_projection = config.prefix_projection
        kv_size = config.num_layers * config.head_dim * config.num_kv_heads * 2
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        if self.prefix_projection:
            self.trans = nn.Sequential(
                nn.Linear(kv_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size)
            )

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        prefix_tokens = self.embedding(prefix)
        return self.trans(prefix_tokens) if self.prefix_projection else prefix_tokens


class ChatGLM2PreTrainedModel(PreTrainedModel):
    config_class = ChatGLM2Config
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["GLMBlock"]
    _keys_to_ignore_on_load_missing = [r"rotary_pos_emb\.inv_freq", r"prefix_encoder\."]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))
        elif isinstance(module, ChatGLM2Model) and module.pre_seq_len is not None:
            init.copy_(
                module.prefix_tokens, torch.arange(module.pre_seq_len, device=module.prefix_tokens.device)
            )


class ChatGLM2Model(ChatGLM2PreTrainedModel):
    """`transformer`: embedding, rotary table, encoder, and the output layer (applied by the LM wrapper)."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__(config)
        self.embedding = Embedding(config)
        self.num_layers = config.num_layers
        self.num_kv_heads = config.num_kv_heads
        self.kv_channels = config.head_dim
        self.seq_length = config.seq_length
        # Rotary on half of each head: RotaryEmbedding(head_dim // 2) rotates head_dim // 2 channels.
        self.rotary_pos_emb = RotaryEmbedding(config.head_dim // 2, rope_ratio=config.rope_ratio)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.pre_seq_len = config.pre_seq_len
        self.prefix_projection = config.prefix_projection
        if self.pre_seq_len is not None:
            self.register_buffer("prefix_tokens", torch.arange(self.pre_seq_len), persistent=False)
            self.prefix_encoder = PrefixEncoder(config)
            # Published: a fixed Dropout(0.1) on the prefix keys/values (not config.hidden_dropout).
            self.dropout = nn.Dropout(0.1)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.word_embeddings = value

    def get_prompt(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value) prefixes, each [b, kv_heads, pre_seq_len, head_dim]."""
        prefix_tokens = self.prefix_tokens.unsqueeze(0).expand(batch_size, -1)
        past = self.prefix_encoder(prefix_tokens).to(dtype)
        past = past.view(
            batch_size, self.pre_seq_len, self.num_layers * 2, self.num_kv_heads, self.kv_channels
        )
        past = self.dropout(past)
        # [layers * 2, b, kv_heads, pre_seq_len, head_dim]; entries 2i and 2i + 1 are layer i's key and value.
        past = past.permute(2, 0, 3, 1, 4)
        return [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]

    def get_masks(
        self,
        attention_mask: torch.Tensor | None,
        batch_size: int,
        seq_len: int,
        past_len: int,
        device: torch.device,
    ) -> torch.Tensor | None:
        """Boolean [b, 1, s, prefix + past + s] mask (True = attend), or None for plain causal / full attention.

        Query i sees every prefix and past position and the new positions up to itself, minus padding
        (attention_mask 0). Without prefix or past, the published code lets padding queries attend
        everywhere, so a left-padded row never softmaxes over nothing (NaN); their outputs are never used.
        """
        prefix_len = self.pre_seq_len or 0
        offset = prefix_len + past_len
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if attention_mask is None and (offset == 0 or seq_len == 1):
            return None  # SDPA is_causal (no history) or attend to all (one new token)

        key_pos = torch.arange(offset + seq_len, device=device)
        query_pos = torch.arange(seq_len, device=device) + offset
        mask = (key_pos[None, :] <= query_pos[:, None]).unsqueeze(0).expand(batch_size, -1, -1)
        if attention_mask is not None:
            keep = attention_mask.to(device=device, dtype=torch.bool)
            missing = past_len + seq_len - keep.shape[-1]
            if missing < 0:
                raise ValueError(
                    f"attention_mask covers {keep.shape[-1]} positions, more than past + new = {past_len + seq_len}"
                )
            keep = torch.cat([keep.new_ones(batch_size, prefix_len + missing), keep], dim=-1)
            mask = mask & keep[:, None, :]
            if offset == 0:
                mask = mask | ~keep[:, :, None]
        # Any row still empty (padding queries with history) attends everywhere rather than producing NaN.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        return mask.unsqueeze(1)

    def get_packed_masks(self, seq_ids: torch.Tensor) -> torch.Tensor | PackedSpans:
        """Boolean [b, 1, s, prefix + s] mask (True = attend) of a packed batch: block-diagonal causal over the
        tokens (no attention across samples), and every token sees the whole P-Tuning v2 prefix. On CUDA with
        flash_attn installed and no prefix: the samples' spans for the varlen kernel instead (no [s, s] mask)."""
        if not self.pre_seq_len and flash_varlen_available(seq_ids.device):
            return PackedSpans.of(seq_ids)
        mask = block_causal_mask(seq_ids)
        if self.pre_seq_len:
            mask = F.pad(mask, (self.pre_seq_len, 0), value=True)
        return mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        seq_ids: torch.Tensor | None = None,
        **kwargs: object,
    ) -> BaseModelOutputWithPast | tuple:
        """`seq_ids` [b, s]: a packed batch, samples numbered 1, 2, ... in each row (0 = padding); attention
        stays inside each sample (the P-Tuning v2 prefix stays visible to all) and `attention_mask` is not
        read. position_ids restart at 0 in each sample (as the packed records hold them; derived when not given)."""
        cache = cache if cache is not None else past_key_values
        refuse_cache(seq_ids, cache, use_cache)
        if seq_ids is not None:
            use_cache = False
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids and inputs_embeds")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.encoder.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False  # the recomputed forward would write the cache twice
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(
                "past_key_values must be a transformers Cache (e.g. DynamicCache), not legacy tuples"
            )

        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        past_len = cache.get_seq_length() if cache is not None else 0

        if position_ids is None and seq_ids is not None:
            position_ids = positions_in_samples(seq_ids.to(device))
        if position_ids is None:
            # Published default: consecutive positions (after any cached ones). generate() passes
            # mask-derived positions instead, so left padding works.
            position_ids = torch.arange(past_len, past_len + seq_len, device=device).unsqueeze(0)
            position_ids = position_ids.expand(batch_size, -1)
        rotary_pos_emb = self.rotary_pos_emb(position_ids, dtype=inputs_embeds.dtype)
        if seq_ids is not None:
            full_attention_mask = self.get_packed_masks(seq_ids.to(device))
        else:
            full_attention_mask = self.get_masks(attention_mask, batch_size, seq_len, past_len, device)
        prefix = self.get_prompt(batch_size, inputs_embeds.dtype) if self.pre_seq_len is not None else None

        hidden_states, all_hidden_states = self.encoder(
            inputs_embeds, full_attention_mask, rotary_pos_emb, prefix, cache, output_hidden_states
        )
        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states
        )


class ChatGLM2ForConditionalGeneration(ChatGLM2PreTrainedModel, GenerationMixin):
    """Causal LM head on ChatGLM2Model; the head is `transformer.output_layer` as published."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__(config)
        self.transformer = ChatGLM2Model(config)
        self.post_init()

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: object) -> None:
        """Write the published checkpoint layout (config schema, parameter names) as safetensors, loadable by
        glmtune's load_model and by tools that read published ChatGLM folders; see glmtune.models.saving.save_model."""
        save_pretrained_published(self, save_directory, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.transformer.output_layer = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        seq_ids: torch.Tensor | None = None,
        **kwargs: object,
    ) -> CausalLMOutputWithPast | tuple:
        """`attention_mask` [b, s] (1 keep, 0 padding), `position_ids` [b, s]; `cache` is transformers 5's
        name for `past_key_values`. `logits_to_keep` > 0 computes logits for only the last positions.
        `seq_ids` [b, s]: a packed batch (see ChatGLM2Model.forward)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if kwargs.pop("return_last_logit", False):  # published generate() flag
            logits_to_keep = 1
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache=cache if cache is not None else past_key_values,
            seq_ids=seq_ids,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.transformer.output_layer(hidden_states)

        loss = None
        if labels is not None:
            # Token t predicts token t + 1; cross entropy in fp32 over non -100 labels.
            shift_logits = logits[:, :-1, :].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
            )

        if not return_dict:
            output = tuple(v for v in (logits, outputs.cache, outputs.hidden_states) if v is not None)
            return (loss, *output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


__all__ = ["ChatGLM2Config", "ChatGLM2ForConditionalGeneration", "ChatGLM2Model", "ChatGLM2PreTrainedModel"]
