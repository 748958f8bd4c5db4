"""ChatGLM-6B (v1): the GLM network of THUDM/chatglm-6b, numerically equal to its published modeling code.

What makes GLM different from a GPT, each commented where it happens:
- 2D rotary positions: half of every head is rotated by the token position, the other half by the
  "block position" (0 in the prompt, 1, 2, 3, ... from `<sop>` on). Generated tokens all keep the
  position of the `[gMASK]` token they fill in.
- prefix-LM attention: the prompt (everything before `<sop>`) attends to itself bidirectionally,
  the answer causally.
- the residual adds the *normalized* input scaled by alpha = sqrt(2 * 28) (DeepNorm style; 28 whatever
  the depth, as published).
- the fused `query_key_value` output is laid out per head as [q | k | v].

Parameter names equal the published checkpoint's. Tensors are [batch, seq, ...] throughout (the
published code runs [seq, batch, ...]; only the numbers have to agree).
"""

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import ModelOutput, logging

from glmtune.models.packing import refuse_cache, sample_starts
from glmtune.models.saving import save_pretrained_published

logger = logging.get_logger(__name__)

# The published attention fills masked scores with -10000 rather than -inf, so a fully masked row (left
# padding) softmaxes to finite values instead of NaN.
MASK_VALUE = -10000.0
# Published v1 applies a fixed dropout of 0.1 to the P-Tuning v2 prefix (no config key for it).
PREFIX_DROPOUT = 0.1
# The residual scale uses GLMBlock's default depth, whatever config.num_layers says (see GLMBlock).
GLMBLOCK_NUM_LAYERS = 28


class ChatGLMConfig(PretrainedConfig):
    """The published ChatGLM-6B config schema; defaults are those of the released chatglm-6b `config.json`."""

    model_type = "chatglm"
    # transformers utilities (DynamicCache(config=...), ...) look for the standard name
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(
        self,
        vocab_size: int = 130528,
        hidden_size: int = 4096,
        num_layers: int = 28,
        num_attention_heads: int = 32,
        layernorm_epsilon: float = 1e-5,
        use_cache: bool = True,
        bos_token_id: int = 130004,
        eos_token_id: int = 130005,
        mask_token_id: int = 130000,
        gmask_token_id: int = 130001,
        pad_token_id: int = 3,
        max_sequence_length: int = 2048,
        inner_hidden_size: int = 16384,
        position_encoding_2d: bool = True,
        quantization_bit: int = 0,
        quantization_embeddings: bool = False,
        pre_seq_len: int | None = None,
        prefix_projection: bool = False,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.layernorm_epsilon = layernorm_epsilon
        self.use_cache = use_cache
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.max_sequence_length = max_sequence_length
        self.inner_hidden_size = inner_hidden_size
        self.position_encoding_2d = position_encoding_2d
        self.quantization_bit = quantization_bit
        self.quantization_embeddings = quantization_embeddings
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        # The published model ties lm_head to word_embeddings (transformers 4 tied by default); the
        # checkpoint stores both tensors, with equal values.
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs
        )


def gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI's tanh approximation of GELU, written out as published (F.gelu differs in the last bits)."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


class PrefixEncoder(nn.Module):
    """P-Tuning v2: trainable key/value prefixes for every layer, [b, pre_seq_len] -> [b, pre_seq_len, L*2*h]."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.prefix_projection = config.prefix_projection
        kv_size = config.num_layers * config.hidden_size * 2
        if self.prefix_projection:
            # reparameterize the prefix through a two-layer MLP (the "projection" variant)
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size),
                nn.Tanh(),
                nn.Linear(config.hidden_size, kv_size),
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, kv_size)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        if self.prefix_projection:
            return self.trans(self.embedding(prefix))
        return self.embedding(prefix)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary embedding over `dim` channels, looked up by (any) position ids."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.base = base
        # persistent because the published checkpoints hold it; the values are always recomputed (below)
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=True)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))
        # Published quirk: the frequencies are rounded to fp16 even when the model runs in fp32.
        return inv_freq.half().float()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, torch.Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # As published: a stored inv_freq is neither required nor read; the buffer keeps its computed value.
        return

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Recomputed rather than read from the buffer, which a cast of the model to bf16 would round further.
        inv_freq = self.compute_inv_freq(position_ids.device)
        freqs = position_ids.float()[..., None] * inv_freq  # [b, s, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, dim]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, s, nh, d]; cos, sin: [b, s, d] (fp32), broadcast over heads."""
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        # 2D positions: each half of a head gets its own rotary of head_dim/2 channels
        self.rotary_emb = RotaryEmbedding(self.head_dim // 2)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * self.num_heads * self.head_dim)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_bias: torch.Tensor,
        cache: Cache | None = None,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden_states [b, s, h]; position_ids [b, 2, s]; attention_bias [b, 1, s, prefix + past + s] additive."""
        b, s, _ = hidden_states.shape
        # The fused projection is laid out per head: [b, s, nh, (q | k | v)], not [q | k | v] over all heads.
        qkv = self.query_key_value(hidden_states).view(b, s, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each [b, s, nh, hd]

        # 2D rotary: first half of each head by token position, second half by block position
        cos, sin = self.rotary_emb(position_ids[:, 0])
        block_cos, block_sin = self.rotary_emb(position_ids[:, 1])
        q1, q2 = q.chunk(2, dim=-1)
        k1, k2 = k.chunk(2, dim=-1)
        q = torch.cat((apply_rotary(q1, cos, sin), apply_rotary(q2, block_cos, block_sin)), dim=-1)
        k = torch.cat((apply_rotary(k1, cos, sin), apply_rotary(k2, block_cos, block_sin)), dim=-1)

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, nh, s, hd]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [b, nh, past + s, hd]
        if prefix_kv is not None:
            # P-Tuning v2 prefixes sit in front of the keys, without rotary; kept out of the cache
            k = torch.cat((prefix_kv[0].to(k.dtype), k), dim=2)
            v = torch.cat((prefix_kv[1].to(v.dtype), v), dim=2)

        # softmax(q.k / sqrt(hd) + bias) v; the published code's per-layer scaling coefficient cancels out
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias)  # [b, nh, s, hd]
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.dense(out)


class GLU(nn.Module):
    """The feed-forward block (named GLU as published, though it is a plain GELU MLP)."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(gelu(self.dense_h_to_4h(x)))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)
        # DeepNorm-style residual: the skip path carries the normalized input scaled by alpha = sqrt(2 * 28).
        # Published quirk: ChatGLMModel never passes num_layers to GLMBlock, whose default of 28 (the 6B
        # depth) therefore holds for every config.
        self.alpha = (2 * GLMBLOCK_NUM_LAYERS) ** 0.5

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_bias: torch.Tensor,
        cache: Cache | None = None,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        attention_input = self.input_layernorm(hidden_states)
        attention_output = self.attention(attention_input, position_ids, attention_bias, cache, prefix_kv)
        hidden_states = attention_input * self.alpha + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input)


def first_index(hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a bool [b, L] tensor: index of the first True (0 if none) and whether there is one."""
    return hits.int().argmax(dim=-1), hits.any(dim=-1)


def first_index_in_sample(hits: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of a bool [b, L] tensor: the index of the first True in the token's sample (the tokens
    sharing its `starts` entry, see glmtune.models.packing.sample_starts), counted from the sample's start,
    and whether there is one. Both [b, L]."""
    L = hits.shape[-1]
    arange = torch.arange(L, device=hits.device).expand_as(hits)
    candidates = torch.where(hits, arange, L)
    # the smallest candidate of each sample, stored at the sample's start, then read back by every token
    first = torch.full_like(candidates, L).scatter_reduce(1, starts, candidates, reduce="amin")
    first = first.gather(1, starts)
    return first - starts, first < L


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["GLMBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        prefix_encoder = getattr(self, "prefix_encoder", None)
        if prefix_encoder is not None and any(module is m for m in prefix_encoder.modules()):
            # The published model leaves the prefix encoder at torch's default init (an N(0, 1) embedding),
            # the starting point P-Tuning v2 trains from.
            if isinstance(module, nn.Embedding):
                init.normal_(module.weight, mean=0.0, std=1.0)
            elif isinstance(module, nn.Linear):
                bound = 1 / math.sqrt(module.in_features)
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                init.uniform_(module.bias, -bound, bound)
            return
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        if not config.position_encoding_2d:
            raise NotImplementedError("only the 2D positions of the released ChatGLM-6B are implemented")
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.pre_seq_len = config.pre_seq_len
        if self.pre_seq_len is not None:
            self.register_buffer("prefix_tokens", torch.arange(self.pre_seq_len), persistent=False)
            self.prefix_encoder = PrefixEncoder(config)
            self.dropout = nn.Dropout(PREFIX_DROPOUT)
        self.gradient_checkpointing = False
        # Selective checkpointing: with gradient checkpointing on, recompute only the first N blocks
        # (None = all). Fewer recomputed blocks trade memory for ~1/3 less compute in each of them.
        self.checkpoint_layers: int | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def get_prompt(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The P-Tuning v2 prefix as one (key, value) pair per layer, each [b, nh, pre_seq_len, hd]."""
        nh = self.config.num_attention_heads
        prefix_tokens = self.prefix_tokens.unsqueeze(0).expand(batch_size, -1)
        kv = self.prefix_encoder(prefix_tokens).to(dtype)  # [b, pre, num_layers * 2 * h]
        kv = kv.view(batch_size, self.pre_seq_len, self.config.num_layers * 2, nh, -1)
        kv = self.dropout(kv)
        # [num_layers * 2, b, nh, pre, hd]: layer i's key is entry 2i, its value 2i+1
        kv = kv.permute(2, 0, 3, 1, 4)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.config.num_layers)]

    def sample_layout(
        self, input_ids: torch.Tensor, seq_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where each token stands in its own sample, [b, L] each: its index from the sample's start, the
        sample's context length (the index of its `<sop>`; its length when it has none, i.e. all context),
        and the index of the `[gMASK]` (else `[MASK]`) that its answer fills in."""
        starts = sample_starts(seq_ids)
        local = torch.arange(input_ids.shape[-1], device=input_ids.device) - starts
        # a sample's length: one past the largest local index among its tokens
        length = torch.zeros_like(local).scatter_reduce(1, starts, local + 1, reduce="amax").gather(1, starts)
        context_length, has_bos = first_index_in_sample(input_ids == self.config.bos_token_id, starts)
        context_length = torch.where(has_bos, context_length, length)
        gmask_pos, has_gmask = first_index_in_sample(input_ids == self.config.gmask_token_id, starts)
        mask_pos, has_mask = first_index_in_sample(input_ids == self.config.mask_token_id, starts)
        # the published code errors out without a mask token; fall back to the token before <sop>
        mask_pos = torch.where(has_gmask, gmask_pos, torch.where(has_mask, mask_pos, context_length - 1))
        return local, context_length, mask_pos

    def get_position_ids(
        self,
        input_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """GLM's 2D position ids [b, 2, L] for whole (optionally left-padded) prompts, as the published tokenizer
        builds them: positions count from the first real token (pads get 0); from `<sop>` on, the position stays
        at the `[gMASK]` (else `[MASK]`) being filled in, and the block position counts 1, 2, 3, ...

        With `seq_ids` [b, L] (a packed batch, 0 = padding) every sample gets the positions it would get alone.
        """
        if seq_ids is None:
            # one sample per row: its real tokens (padding_mask 1), or the whole row
            seq_ids = padding_mask.long() if padding_mask is not None else torch.ones_like(input_ids)
        local, context_length, mask_pos = self.sample_layout(input_ids, seq_ids)
        in_block = local >= context_length
        real = seq_ids != 0
        positions = torch.where(in_block, mask_pos, local) * real
        block_positions = torch.where(in_block, local - context_length + 1, 0) * real
        return torch.stack((positions, block_positions), dim=1)

    def get_packed_masks(self, input_ids: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
        """The prefix-LM mask of a packed batch, bool [b, 1, L, L], True = masked: a token sees the tokens of its
        own sample up to itself and that sample's whole prompt before `<sop>`; never another sample or padding."""
        L = input_ids.shape[-1]
        local, context_length, _ = self.sample_layout(input_ids, seq_ids)
        arange = torch.arange(L, device=input_ids.device)
        causal = arange[None, :] <= arange[:, None]  # [L(query), L(key)]
        in_context = (local < context_length)[:, None, :]  # [b, 1, L(key)]
        same = (seq_ids[:, :, None] == seq_ids[:, None, :]) & (seq_ids != 0)[:, None, :]
        return ~(same & (causal[None] | in_context))[:, None]

    def get_masks(
        self,
        input_ids: torch.Tensor | None,
        padding_mask: torch.Tensor | None,
        past_length: int,
        query_length: int,
        device: torch.device,
    ) -> torch.Tensor:
        """The prefix-LM mask, bool [b, 1, q, past + q], True = masked: causal, except that every token sees the
        whole prompt before `<sop>`; left padding is never attended to."""
        query_pos = torch.arange(past_length, past_length + query_length, device=device)
        key_pos = torch.arange(past_length + query_length, device=device)
        # context_length = index of <sop>; 0 when it is not among the new tokens (then it is in the cache, or
        # the row has none and the model runs as a plain causal LM)
        if input_ids is not None:
            bos_index, has_bos = first_index(input_ids == self.config.bos_token_id)
            context_length = torch.where(has_bos, past_length + bos_index, 0)
        else:
            context_length = torch.zeros(1, dtype=torch.long, device=device)
        causal = key_pos[None, :] <= query_pos[:, None]  # [q, past + q]
        in_context = key_pos[None, None, :] < context_length[:, None, None]  # [b, 1, past + q]
        visible = causal[None] | in_context  # [b, q, past + q]
        if padding_mask is not None:
            visible = visible & padding_mask.bool()[:, None, :]
        return ~visible[:, None]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        seq_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """attention_mask: None, a padding mask [b, past + q] (1 = keep), or the published bool mask
        [b, 1, q, past + q] (True = masked; a float 4D mask is taken as an additive bias).
        position_ids: [b, 2, q] (positions, block positions); derived from input_ids when not given.
        seq_ids: [b, q], a packed batch (samples numbered 1, 2, ... in each row, 0 = padding): each sample gets
        the 2D positions and prefix-LM mask it would get alone, derived from input_ids; the 2D padding mask and
        the records' 1D position_ids [b, q] are then not read."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if seq_ids is not None:
            refuse_cache(seq_ids, past_key_values if past_key_values is not None else cache, use_cache)
            if input_ids is None:
                raise ValueError(
                    "seq_ids (a packed batch) needs input_ids: each sample's <sop> is found in them"
                )
            if (position_ids is not None and position_ids.dim() == 3) or (
                attention_mask is not None and attention_mask.dim() == 4
            ):
                raise ValueError(
                    "seq_ids (a packed batch) derives each sample's 2D positions and mask: pass no [b, 2, q] "
                    "position_ids or 4D attention_mask with it"
                )
            use_cache = False
            position_ids = self.get_position_ids(input_ids, seq_ids=seq_ids)
            attention_mask = self.get_packed_masks(input_ids, seq_ids)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once(
                "gradient checkpointing does not work with use_cache=True; using use_cache=False"
            )
            use_cache = False
        past_key_values = past_key_values if past_key_values is not None else cache
        if isinstance(past_key_values, tuple | list):
            raise ValueError("past_key_values must be a transformers Cache (DynamicCache), not tuples")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        b, q = inputs_embeds.shape[:2]
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0

        padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if position_ids is None:
            if past_length > 0:
                raise ValueError("position_ids [b, 2, q] are required when continuing from a non-empty cache")
            if input_ids is not None:
                position_ids = self.get_position_ids(input_ids, padding_mask)
            else:  # no token ids to find <sop> in: plain positions
                arange = torch.arange(q, device=inputs_embeds.device).expand(b, q)
                position_ids = torch.stack((arange, torch.zeros_like(arange)), dim=1)

        if attention_mask is None or attention_mask.dim() == 2:
            attention_mask = self.get_masks(input_ids, padding_mask, past_length, q, inputs_embeds.device)
        attention_mask = attention_mask.to(inputs_embeds.device)
        if attention_mask.dtype == torch.bool:
            attention_bias = torch.zeros_like(attention_mask, dtype=inputs_embeds.dtype)
            attention_bias = attention_bias.masked_fill(attention_mask, MASK_VALUE)
        else:
            attention_bias = attention_mask.to(inputs_embeds.dtype)
        position_ids = position_ids.to(inputs_embeds.device)

        prefix_kvs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.config.num_layers
        if self.pre_seq_len is not None:
            prefix_kvs = self.get_prompt(b, inputs_embeds.dtype)
            # every token attends to all prefix positions
            attention_bias = F.pad(attention_bias, (self.pre_seq_len, 0), value=0.0)

        hidden_states = inputs_embeds
        all_hidden_states: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, (layer, prefix_kv) in enumerate(zip(self.layers, prefix_kvs)):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            layer_cache = past_key_values if use_cache else None
            if checkpointing and (self.checkpoint_layers is None or index < self.checkpoint_layers):
                # The block itself, not a bound method: glmtune.training.compile compiles the recomputation
                # and the block together through this call.
                hidden_states = self._gradient_checkpointing_func(
                    layer, hidden_states, position_ids, attention_bias, layer_cache, prefix_kv
                )
            else:
                hidden_states = layer(hidden_states, position_ids, attention_bias, layer_cache, prefix_kv)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=past_key_values if use_cache else None,
            hidden_states=all_hidden_states,
        )


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: object) -> None:
        """Write the published checkpoint layout (config schema, parameter names) as safetensors, loadable by
        glmtune's load_model and by tools that read published ChatGLM folders; see glmtune.models.saving.save_model."""
        save_pretrained_published(self, save_directory, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
        seq_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """See ChatGLMModel.forward for the mask and position formats. `cache` is transformers 5's name for
        `past_key_values` (generate() passes it); `logits_to_keep` > 0 computes logits for the last positions only."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values if past_key_values is not None else cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            seq_ids=seq_ids,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            # next-token cross entropy, computed in fp32 as published
            shift_logits = logits.float()[:, :-1].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100).to(logits.dtype)

        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )
        return output if return_dict else output.to_tuple()

    # ---- generation -------------------------------------------------------------------------------------
    # transformers' generate() knows 2D padding masks and 1D positions; GLM needs its 2D positions (a new token
    # keeps the [gMASK] position, its block position counts on) and, when given, the published 4D mask.

    def generate(
        self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
    ) -> torch.Tensor | ModelOutput:
        """As GenerationMixin.generate, also taking the published tokenizer's 4D bool `attention_mask` and
        [b, 2, L] `position_ids`; a 2D padding mask (or none) works too."""
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() == 4:
            # transformers rejects 4D masks in generate(): carry it under another name and extend it per step
            # the way the published code does
            kwargs["attention_mask_4d"] = kwargs.pop("attention_mask")
        return super().generate(inputs, generation_config, **kwargs)

    def _prepare_position_ids_for_generation(
        self, inputs_tensor: torch.Tensor, model_kwargs: dict
    ) -> torch.Tensor:
        input_ids = model_kwargs.get("input_ids", inputs_tensor)
        if input_ids is None or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError("generate() without input_ids needs position_ids [b, 2, L]")
        padding_mask = model_kwargs.get("attention_mask")
        return self.transformer.get_position_ids(input_ids, padding_mask)

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.Tensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.Tensor | None, dict]:
        # [b, 2, L] position ids expand along the batch dim (transformers would take dim 1 of a 3D tensor)
        position_ids = model_kwargs.pop("position_ids", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if position_ids is not None:
            model_kwargs["position_ids"] = position_ids.repeat_interleave(expand_size, dim=0)
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        next_sequence_length: int | None = None,
        attention_mask_4d: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, **kwargs
        )
        if attention_mask_4d is not None:
            ids = model_inputs.get("input_ids")
            query_length = ids.shape[1] if ids is not None else model_inputs["inputs_embeds"].shape[1]
            model_inputs["attention_mask"] = attention_mask_4d[:, :, -query_length:]
        return model_inputs

    def _update_model_kwargs_for_generation(
        self,
        outputs: CausalLMOutputWithPast,
        model_kwargs: dict,
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict:
        position_ids = model_kwargs.pop("position_ids", None)
        mask_4d = model_kwargs.pop("attention_mask_4d", None)
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if position_ids is not None:
            # new tokens keep the position of the mask they fill in; the block position counts on
            new_positions = position_ids[..., -1:].repeat(1, 1, num_new_tokens)
            new_positions[:, 1] += torch.arange(1, num_new_tokens + 1, device=position_ids.device)
            model_kwargs["position_ids"] = torch.cat((position_ids, new_positions), dim=-1)
        if mask_4d is not None:
            for _ in range(num_new_tokens):
                # no earlier token sees the new one; the new one sees what the last token saw, and itself
                mask_4d = F.pad(mask_4d, (0, 1), value=True)
                new_row = mask_4d[:, :, -1:].clone()
                new_row[..., -1] = False
                mask_4d = torch.cat((mask_4d, new_row), dim=2)
            model_kwargs["attention_mask_4d"] = mask_4d
        return model_kwargs


__all__ = ["ChatGLMConfig", "ChatGLMModel", "ChatGLMForConditionalGeneration", "ChatGLMPreTrainedModel"]
