"""What one ChatGLM2-6B block costs under LoRA training: the activations it keeps, and the GEMM FLOPs of
its step when it is recomputed (CPU).

    python bench/block_costs.py              # 256 tokens, bf16 weights, LoRA r=8 (fp32 adapters) on every linear
    python bench/block_costs.py --tokens 512

Builds one block of the 6B shape (hidden 4096, MLP 13,696, 32 heads, 2 key/value groups) with random bf16
weights three ways — the peer (transformers `GlmForCausalLM` + PEFT LoRA on all linear layers), glmtune's
model with PEFT's plain LoRA, and glmtune's model through `apply_method` (fused LoRA) — and measures:

- memory: one forward of `--tokens` tokens under `torch.autograd.graph.saved_tensors_hooks`, adding up the
  distinct storages the autograd graph keeps, weights and the block's input excluded. That is what a block
  costs when it is not recomputed; gradient checkpointing keeps only its input. Per token, so it scales to
  any batch: x 8192 for the 1024 x 8 row of bench/gpu_lora.py.
- compute: the FLOPs `torch.utils.flop_counter` counts in one forward and one backward of the block under
  non-reentrant activation checkpointing (as both sides train in gpu_lora.py), the backward including the
  recomputation. What recomputing a block costs, independent of the hardware.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = dict(hidden=4096, ffn=13696, heads=32, head_dim=128, groups=2)


def saved_bytes(run, excluded: set[int]) -> tuple[int, dict[str, int]]:
    """Bytes of the distinct storages autograd saves while `run()` executes, and those bytes by dtype."""
    storages: dict[int, tuple[int, str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = (storage.nbytes(), str(t.dtype).removeprefix("torch."))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    by_dtype: dict[str, int] = {}
    for nbytes, dtype in storages.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return sum(by_dtype.values()), by_dtype


def recomputed_step_flops(forward, x: torch.Tensor) -> tuple[int, int]:
    """FLOPs of one forward of `forward(x)` under non-reentrant checkpointing, and of its backward (which
    recomputes it)."""
    from torch.utils.checkpoint import checkpoint
    from torch.utils.flop_counter import FlopCounterMode

    forward_count, backward_count = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with forward_count:
        out = checkpoint(forward, x, use_reentrant=False)
    with backward_count:
        out.float().square().sum().backward()
    return forward_count.get_total_flops(), backward_count.get_total_flops()


def storages_of(model: torch.nn.Module, *tensors: torch.Tensor) -> set[int]:
    found = {p.untyped_storage().data_ptr() for p in model.parameters()}
    found |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    return found | {t.untyped_storage().data_ptr() for t in tensors}


def glmtune_block(fused: bool):
    """(model, block, rotary table maker) of a one-block ChatGLM2-6B-shaped model with LoRA r=8."""
    from peft import LoraConfig, get_peft_model

    from glmtune.config import LoraArgs, TaskConfig
    from glmtune.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
    from glmtune.training.methods import apply_method

    config = ChatGLM2Config(
        num_layers=1,
        hidden_size=SHAPE["hidden"],
        ffn_hidden_size=SHAPE["ffn"],
        num_attention_heads=SHAPE["heads"],
        kv_channels=SHAPE["head_dim"],
        multi_query_attention=True,
        multi_query_group_num=SHAPE["groups"],
        add_qkv_bias=True,
        padded_vocab_size=256,
        use_cache=False,
    )
    model = ChatGLM2ForConditionalGeneration(config).to(torch.bfloat16)
    model.glmtune_family = "chatglm2"
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    if fused:
        cfg = TaskConfig(method="lora", lora=LoraArgs(r=8, alpha=16, dropout=0.0, target_modules=targets))
        model = apply_method(model, cfg, total_steps=1)
    else:
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
        )
    inner = model.base_model.model.transformer

    def forward(x: torch.Tensor) -> torch.Tensor:
        rope = inner.rotary_pos_emb(torch.arange(x.shape[1])[None], torch.bfloat16)
        return inner.encoder.layers[0](x, None, rope)

    return model, forward


def peer_block():
    from peft import LoraConfig, get_peft_model
    from transformers import GlmConfig, GlmForCausalLM

    config = GlmConfig(
        vocab_size=256,
        hidden_size=SHAPE["hidden"],
        intermediate_size=SHAPE["ffn"],
        num_hidden_layers=1,
        num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["groups"],
        head_dim=SHAPE["head_dim"],
        attention_bias=True,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    model = GlmForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    inner = model.base_model.model.model

    def forward(x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1])[None]
        embeddings = inner.rotary_emb(x, positions)
        out = inner.layers[0](x, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
        return out[0] if isinstance(out, tuple) else out

    return model, forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=256, help="sequence length of the measured forward")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name, build in (
        ("peer: GlmForCausalLM + PEFT LoRA", peer_block),
        ("glmtune model + PEFT LoRA", lambda: glmtune_block(fused=False)),
        ("glmtune (apply_method: fused LoRA)", lambda: glmtune_block(fused=True)),
    ):
        model, forward = build()
        model.train()
        x = torch.randn(1, args.tokens, SHAPE["hidden"], dtype=torch.bfloat16, requires_grad=True)
        total, by_dtype = saved_bytes(functools.partial(forward, x), storages_of(model, x))
        forward_flops, backward_flops = recomputed_step_flops(forward, x)
        rows.append(
            (name, total / args.tokens, by_dtype, forward_flops / args.tokens, backward_flops / args.tokens)
        )
        del model
    print(f"one ChatGLM2-6B-shaped block, bf16 weights, LoRA r=8 on every linear, {args.tokens} tokens:\n")
    print("what the block keeps for its backward when it is not recomputed:\n")
    print("| block | saved KB / token | of which fp32 | GiB at 1024 x 8 |")
    print("| --- | ---: | ---: | ---: |")
    for name, per_token, by_dtype, _, _ in rows:
        fp32 = by_dtype.get("float32", 0) / args.tokens
        print(f"| {name} | {per_token / 1e3:.0f} | {fp32 / 1e3:.0f} | {per_token * 8192 / 2**30:.2f} |")
    print(
        "\nGFLOP per token of a step with the block recomputed (forward; backward with the recomputation):\n"
    )
    print("| block | forward | backward | step | step / peer's |")
    print("| --- | ---: | ---: | ---: | ---: |")
    peer_step = rows[0][3] + rows[0][4]
    for name, _, _, forward_flops, backward_flops in rows:
        step = forward_flops + backward_flops
        print(
            f"| {name} | {forward_flops / 1e9:.3f} | {backward_flops / 1e9:.3f} | {step / 1e9:.3f} "
            f"| {step / peer_step:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
