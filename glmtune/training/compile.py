"""torch.compile for training, one transformer block at a time.

Compiling each block in place (`nn.Module.compile`) rather than the whole model:
- parameter names do not change (no `_orig_mod.` prefix), so PEFT, checkpoints and saved artifacts are the
  same as without compiling;
- every block runs the same code, so they share one compiled graph (parameters are graph inputs): the
  compile time is that of one block, whatever the depth;
- what is outside the blocks stays eager: the chunked loss, P-Tuning v2's prefix encoder, and generation.

Inside a block the compiler fuses what eager PyTorch runs as separate kernels: the norms' fp32 maths, the
rotary embedding, SwiGLU, LoRA's scaling and the residual adds. That saves memory traffic on large batches
and kernel launches on small ones, where a 6B model's step is bound by launches rather than by the GPU.

With gradient checkpointing, the recomputed blocks of glmtune's ChatGLM models are compiled together with
their checkpoint (`recompute_block`): the compiled forward keeps only the block's inputs, and the backward
graph recomputes only what it needs. Checkpointing a compiled block from outside would rerun its whole
compiled forward, the last GEMM included, whose output the backward never reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: the `nn.ModuleList` of same-class modules holding the most
    parameters (`transformer.encoder.layers` in ChatGLM2/3, `transformer.layers` in ChatGLM-6B,
    `model.layers` in LLaMA-like models)."""
    best, best_params = None, 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = module, params
    if best is None:
        raise ValueError(f"{type(model).__name__}: no stack of transformer blocks (nn.ModuleList) found")
    return best


def recompute_block(block: nn.Module, *args: Any) -> Any:
    """`block(*args)`, recomputed in the backward (non-reentrant activation checkpointing)."""
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


def compile_blocks(model: nn.Module, mode: str = "default", backend: str | Callable = "inductor") -> int:
    """Compile every transformer block of `model` in place; returns how many. Where the stack is a glmtune
    ChatGLM one with gradient checkpointing on (enable it first), its recomputed blocks run through a compiled
    `recompute_block` instead. The first step of each new input shape compiles (a minute or more on a CPU);
    after a second shape, the sequence length is treated as dynamic and does not recompile. `backend` is
    torch.compile's (tests inspect the graphs with their own)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    options = {"backend": backend} if backend != "inductor" else {"mode": mode}
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(**options)
    owner = next((m for m in model.modules() if any(child is blocks for child in m.children())), None)
    # glmtune's ChatGLM stacks (the ones with `checkpoint_layers`) pass the block itself to their
    # checkpointing function; LLaMA-like models checkpoint inside the block's own __call__.
    if getattr(owner, "gradient_checkpointing", False) and hasattr(owner, "checkpoint_layers"):
        owner._gradient_checkpointing_func = torch.compile(recompute_block, **options)
    return len(blocks)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled code eagerly inside the block: for generation, whose growing key/value cache would make
    the compiled blocks recompile at every new length."""
    with torch.compiler.set_stance("force_eager"):
        yield
