"""Packed batches: several samples per row, kept apart in attention.

A packed batch (`glmtune.data.build.pack_record`, padded by the collator) carries `seq_ids` [b, s]: the
samples of a row numbered 1, 2, 3, ..., 0 for padding. Every model forward glmtune trains through takes
`seq_ids` and lets a token attend only to earlier tokens of its own sample:

- ChatGLM2/3 and ChatGLM-6B read it in their own forward (the 6B also derives each sample's 2D positions
  and prefix-LM mask from it); ChatGLM2/3 on CUDA with flash_attn installed hand FlashAttention's varlen
  kernel the samples' spans (`PackedSpans`) instead of building an [s, s] mask per row;
- transformers models do not know the argument: `accept_packed_batches` (called by `load_model`) makes
  their forward turn it into a block-diagonal attention mask, below any PEFT wrapper.

A packed batch is a whole sequence for a loss: it never continues from, or writes, a key/value cache.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def block_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, T] packed-sample ids (0 = padding) -> [B, 1, T, T] attention mask, query i may see key j iff both
    belong to the same sample and j <= i: block diagonal and causal, never across samples.

    Returns bool (True = attend), as scaled_dot_product_attention takes it, or with `dtype` an additive float
    mask (0 / most negative value). Padding rows see only themselves, so no softmax row is empty (NaN)."""
    t = seq_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seq_ids.device).tril()
    same = seq_ids[:, :, None] == seq_ids[:, None, :]  # [B, T(query), T(key)]
    real = (seq_ids != 0)[:, None, :]
    eye = torch.eye(t, dtype=torch.bool, device=seq_ids.device)
    mask = ((same & real & causal) | eye)[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=seq_ids.device).masked_fill(
        ~mask, torch.finfo(dtype).min
    )


def cu_seqlens(seq_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sample lengths over the batch's real tokens, row by row ([0, n1, n1+n2, ...], int32, on
    seq_ids' device) and the longest sample: the varlen-attention (flash-attn) view of the same packing, for
    tokens gathered in row-major order (`seq_ids.flatten() != 0`)."""
    flat = seq_ids.flatten()
    rows = torch.arange(seq_ids.shape[0], device=seq_ids.device).repeat_interleave(seq_ids.shape[1])
    real = flat != 0
    flat, rows = flat[real], rows[real]
    # a sample starts where the id or the row changes
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = (flat[1:] != flat[:-1]) | (rows[1:] != rows[:-1])
    bounds = torch.cat([torch.nonzero(starts).flatten(), flat.new_tensor([len(flat)])])
    lengths = bounds[1:] - bounds[:-1]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=seq_ids.device)
    cu[1:] = lengths.cumsum(0)
    return cu, int(lengths.max()) if len(lengths) else 0


@dataclass(frozen=True)
class PackedSpans:
    """A packed batch as FlashAttention's varlen kernel takes it (CUDA, half precision): the real tokens
    gathered row by row and each sample's span among them. No [s, s] mask is built per row."""

    seq_ids: torch.Tensor  # [b, s], kept for the mask fallback
    indices: torch.Tensor  # [n] positions of the real tokens in the flattened [b * s]
    cu_seqlens: torch.Tensor  # [samples + 1] int32
    max_seqlen: int

    @classmethod
    def of(cls, seq_ids: torch.Tensor) -> PackedSpans:
        cu, longest = cu_seqlens(seq_ids)
        return cls(seq_ids, torch.nonzero(seq_ids.flatten() != 0).flatten(), cu, longest)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        """Causal attention inside each sample. query [b, heads, s, d]; key, value [b, kv_heads, s, d] (the
        kernel reads grouped key/value heads in place). Returns [b, heads, s, d], zeros at padding."""
        from flash_attn import flash_attn_varlen_func

        b, heads, s, d = query.shape

        def gather(x: torch.Tensor) -> torch.Tensor:  # [b, h, s, d] -> [n, h, d]
            return x.transpose(1, 2).reshape(b * s, x.shape[1], d)[self.indices]

        out = flash_attn_varlen_func(
            gather(query),
            gather(key),
            gather(value),
            self.cu_seqlens,
            self.cu_seqlens,
            self.max_seqlen,
            self.max_seqlen,
            dropout_p=dropout_p,
            causal=True,
        )
        full = out.new_zeros(b * s, heads, d).index_copy(0, self.indices, out)
        return full.view(b, s, heads, d).transpose(1, 2)


def flash_varlen_available(device: torch.device) -> bool:
    """Whether FlashAttention's varlen kernel can run packed attention on `device` (CUDA, flash_attn installed)."""
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def sample_starts(seq_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] -> for every token, the index in its row of its sample's first token (a run of padding counts
    as a sample too). Samples are contiguous runs of one id, as the packer writes them."""
    arange = torch.arange(seq_ids.shape[-1], device=seq_ids.device).expand_as(seq_ids)
    is_start = torch.ones_like(seq_ids, dtype=torch.bool)
    is_start[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    return torch.where(is_start, arange, 0).cummax(dim=-1).values


def positions_in_samples(seq_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] -> each token's index within its own sample (0, 1, 2, ... restarting at every sample)."""
    return torch.arange(seq_ids.shape[-1], device=seq_ids.device) - sample_starts(seq_ids)


def refuse_cache(seq_ids: torch.Tensor | None, cache: object | None, use_cache: bool | None) -> None:
    """A packed batch is a whole sequence: it neither continues from nor fills a key/value cache."""
    if seq_ids is not None and (cache is not None or use_cache):
        raise ValueError(
            "seq_ids (a packed batch of several samples per row) cannot be used with a key/value cache or "
            "generate(): pass use_cache=False and no past_key_values, or generate from unpacked inputs"
        )


class PackedForward:
    """A transformers model's own forward, also taking `seq_ids`: turned into a block-diagonal causal 4D
    attention mask (transformers uses a 4D mask as given). The records' position_ids, restarting at 0 in each
    sample, pass through. Set as the model instance's `forward`; copies and pickles rebind to the copy."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def __signature__(self) -> inspect.Signature:
        """The class forward's signature plus `seq_ids`: generate() and PEFT read it to decide which arguments
        (attention_mask, position_ids, logits_to_keep, ...) to pass."""
        signature = inspect.signature(type(self.model).forward.__get__(self.model))
        parameters = list(signature.parameters.values())
        seq_ids = inspect.Parameter("seq_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next(
            (i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters)
        )
        return signature.replace(parameters=[*parameters[:at], seq_ids, *parameters[at:]])

    def __reduce__(self) -> tuple:
        return PackedForward, (self.model,)

    def __call__(self, *args: Any, seq_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        model = self.model
        forward = type(model).forward
        if seq_ids is None:
            return forward(model, *args, **kwargs)
        refuse_cache(seq_ids, kwargs.get("past_key_values"), kwargs.get("use_cache"))
        implementation = getattr(model.config, "_attn_implementation", None) or "eager"
        if "flash" in implementation:
            raise ValueError(
                f"packed batches (data.packing) take a 4D attention mask, which attn_implementation "
                f"{implementation!r} cannot apply; load the model with sdpa or eager attention"
            )
        # eager attention adds the mask to the scores; the other kernels take True = attend
        dtype = model.dtype if implementation == "eager" else None
        kwargs["attention_mask"] = block_causal_mask(seq_ids.to(model.device), dtype=dtype)
        kwargs["use_cache"] = False
        return forward(model, *args, **kwargs)


def accept_packed_batches(model: nn.Module) -> nn.Module:
    """Let a transformers causal LM take the collated packed batch, `model(**batch)` with `seq_ids`.

    The model instance's `forward` is replaced (see PackedForward) rather than hooked: PEFT wrappers call
    `forward` of the model they wrap directly, past any hook, and pass `seq_ids` on in their kwargs. Calls
    without `seq_ids` (generation, unpacked batches) run the class's forward unchanged."""
    model.forward = PackedForward(model)
    return model
