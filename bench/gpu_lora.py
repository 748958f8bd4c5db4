"""LoRA training speed and memory: glmtune vs transformers GlmForCausalLM + PEFT, side by side in one run.

Both sides train the same ChatGLM2-6B-shaped network with random bf16 weights, LoRA r=8 on every block
linear, AdamW, SDPA attention. The peer is the stack users would otherwise reach for, in a plain loop with
full gradient checkpointing. glmtune runs its real LightningModule and method code (apply_method +
models.ChatModel, the class train.py trains with, under a Lightning Trainer) with its optimisations: chunked cross entropy (no fp32 logits over
the vocabulary), selective activation checkpointing sized to stay under the peer's peak memory, fused LoRA.
Then ChatGLM-6B (v1) LoRA at 128 x 1 with bf16, int8 and int4 weights reports peak memory. Last, rows
"glmtune+compile" repeat glmtune's with `train.compile` (torch.compile'd blocks) on CUDA, and
"glmtune+cudagraphs" the small shapes with `compile_mode: reduce-overhead` (CUDA graphs: no launch costs).

    python bench/gpu_lora.py                 # on a CUDA machine: the full table (about 5 minutes on an H200)
    python bench/gpu_lora.py --tiny          # tiny sizes on CPU: checks the script itself
    python bench/gpu_lora.py --profile 1024x8 --skip v1,compile   # + the top kernels of glmtune's step there
    python bench/gpu_lora.py --host-bound    # CPU stand-in for the launch-bound 128x1 case (see HOST_BOUND)

Prints a table and writes JSON to bench/results/gpu_lora-<card>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 1024**3


@dataclass
class Result:
    side: str
    shape: str
    tokens_per_s: float = float("nan")
    step_s: float = float("nan")
    peak_gib: float = float("nan")
    mfu: float = float("nan")
    losses: list[float] = field(default_factory=list)
    note: str = ""


# ---------------------------------------------------------------------------------------------- shapes


CHATGLM2_6B = dict(
    num_layers=28,
    hidden_size=4096,
    ffn_hidden_size=13696,
    num_attention_heads=32,
    kv_channels=128,
    multi_query_group_num=2,
    padded_vocab_size=65024,
)
TINY = dict(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=160,
    num_attention_heads=4,
    kv_channels=16,
    multi_query_group_num=2,
    padded_vocab_size=512,
)
# The CPU stand-in for the host-bound case (`--host-bound`): the 6B model's 28 blocks and its ops, but so narrow
# that every op costs its launch and dispatch only, as a 6B model's ops at 128 x 1 do on a GPU.
HOST_BOUND = dict(TINY, num_layers=CHATGLM2_6B["num_layers"])


def chatglm2_shape(tiny: bool | str) -> dict:
    """The 6B shape; TINY when `tiny`; HOST_BOUND when `tiny` is "host-bound"."""
    if tiny == "host-bound":
        return dict(HOST_BOUND)
    return dict(TINY if tiny else CHATGLM2_6B)


def chatglm_v1_shape(tiny: bool) -> dict:
    if tiny:
        return dict(
            num_layers=2, hidden_size=64, inner_hidden_size=256, num_attention_heads=4, vocab_size=130528
        )
    return dict(
        num_layers=28, hidden_size=4096, inner_hidden_size=16384, num_attention_heads=32, vocab_size=130528
    )


def linear_params(shape: dict) -> int:
    """Parameters of every matmul a token goes through (blocks + output layer), for the FLOP count."""
    h, heads, d, g = (
        shape["hidden_size"],
        shape["num_attention_heads"],
        shape["kv_channels"],
        shape["multi_query_group_num"],
    )
    per_layer = (
        h * (heads * d + 2 * g * d)
        + heads * d * h
        + h * 2 * shape["ffn_hidden_size"]
        + shape["ffn_hidden_size"] * h
    )
    return shape["num_layers"] * per_layer + h * shape["padded_vocab_size"]


def train_flops_per_token(shape: dict, seq: int) -> float:
    """Model FLOPs of one LoRA training token: forward 2N + input gradients 2N (frozen weights get no
    gradient), plus causal attention (QK^T and PV, half the square) forward and twice that backward.
    Recomputation is not counted: MFU credits only useful work."""
    attn_fwd = 2 * 2 * seq * shape["num_attention_heads"] * shape["kv_channels"] * 0.5
    return 4 * linear_params(shape) + 3 * attn_fwd * shape["num_layers"]


def measure_matmul_flops(device: torch.device, tiny: bool) -> float:
    n = 256 if tiny else 8192
    dtype = torch.float32 if tiny else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else float("nan")


def allocated_gib(device: torch.device) -> float:
    return torch.cuda.memory_allocated() / GiB if device.type == "cuda" else 0.0


def random_batch(batch: int, seq: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    return {"input_ids": ids, "labels": ids.clone()}


# ------------------------------------------------------------------------------------------------ peer


def run_peer(shapes, args, device, dtype, matmul, report=None) -> list[Result]:
    from peft import LoraConfig, get_peft_model
    from transformers import GlmConfig, GlmForCausalLM

    s = chatglm2_shape("host-bound" if args.host_bound else args.tiny)
    config = GlmConfig(
        vocab_size=s["padded_vocab_size"],
        hidden_size=s["hidden_size"],
        intermediate_size=s["ffn_hidden_size"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["multi_query_group_num"],
        head_dim=s["kv_channels"],
        attention_bias=True,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = GlmForCausalLM(config).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    model.train()
    # PyTorch's default on a GPU is the foreach implementation; on the CPU it is a loop over the tensors: the
    # host-bound stand-in asks for foreach, to issue what the GPU run issues.
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True if args.host_bound else None
    )
    results = []
    for batch_size, seq in shapes:
        r = Result("peer", f"{seq}x{batch_size}")
        try:
            reset_peak(device)
            times, r.losses = plain_loop_steps(
                model,
                optimizer,
                lambda b=batch_size, n=seq: random_batch(b, n, s["padded_vocab_size"], device),
                args,
                device,
            )
            fill(r, times, batch_size, seq, s, matmul, device)
        except torch.cuda.OutOfMemoryError as err:
            r.note = f"OOM: {str(err)[:80]}"
            optimizer.zero_grad(set_to_none=True)
        results.append(r)
        print(row(r), flush=True)
        if report:
            report(r)
    del model, optimizer
    reset_peak(device)
    return results


def plain_loop_steps(
    model, optimizer, make_batch, args, device, chunked: bool = False
) -> tuple[list[float], list[float]]:
    """warmup + steps optimizer steps in a plain loop: the timed steps' seconds and losses (`chunked`: glmtune's
    training loss, else the model's own)."""
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        batch = make_batch()
        sync(device)
        t0 = time.perf_counter()
        loss = lm_loss(model, batch, chunked)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    return times, losses


def fill(
    r: Result, times: list[float], batch_size: int, seq: int, shape: dict, matmul: float, device
) -> None:
    step = sorted(times)[len(times) // 2]
    r.step_s = step
    r.tokens_per_s = batch_size * seq / step
    r.peak_gib = peak_gib(device)
    r.mfu = r.tokens_per_s * train_flops_per_token(shape, seq) / matmul


# -------------------------------------------------------------------------------------------- glmtune


class StepTimer:
    """Lightning callback: wall time of each optimizer step, synchronised with the device."""

    def __init__(self, device: torch.device):
        import lightning as L

        class _Timer(L.Callback):
            def __init__(inner):
                inner.times: list[float] = []
                inner.losses: list[float] = []
                inner.t0 = 0.0

            def on_train_batch_start(inner, trainer, module, batch, batch_idx):
                sync(device)
                inner.t0 = time.perf_counter()

            def on_train_batch_end(inner, trainer, module, outputs, batch, batch_idx):
                sync(device)
                inner.times.append(time.perf_counter() - inner.t0)
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                inner.losses.append(float(loss.detach()))

        self.callback = _Timer()


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def glmtune_lora_model(shape: dict, device, dtype, v1: bool = False, bits: int = 0):
    from glmtune.config import LoraArgs, TaskConfig
    from glmtune.models import quantization
    from glmtune.training.methods import apply_method

    if v1:
        from glmtune.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

        config = ChatGLMConfig(**shape, use_cache=False)
        with torch.device(device):
            model = ChatGLMForConditionalGeneration(config).to(dtype)
        model.glmtune_family = "chatglm"
    else:
        from glmtune.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration

        config = ChatGLM2Config(**shape, multi_query_attention=True, add_qkv_bias=True, use_cache=False)
        with torch.device(device):
            model = ChatGLM2ForConditionalGeneration(config).to(dtype)
        model.glmtune_family = "chatglm2"
    if bits:
        quantization.quantize_model(model, bits)
    cfg = TaskConfig(method="lora", lora=LoraArgs(r=8, alpha=16, dropout=0.0))
    model = apply_method(model, cfg, total_steps=1000)
    model.train()
    return model


def fit_steps(model, batch_size: int, seq: int, vocab: int, args, device) -> tuple[list[float], list[float]]:
    """Train warmup + steps optimizer steps through train.py's LightningModule and a Lightning Trainer."""
    import lightning as L

    from glmtune.config import TrainArgs
    from models import ChatModel

    total = args.warmup + args.steps
    module = ChatModel(
        model,
        TrainArgs(learning_rate=1e-4, gradient_clip_val=0.0, scheduler="constant"),
        total_steps=total,
        method="lora",
    )
    timer = StepTimer(device).callback
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=total,
        precision="bf16-true" if device.type == "cuda" else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
        gradient_clip_val=None,
    )
    loader = torch.utils.data.DataLoader(RandomTokens(total * batch_size, seq, vocab), batch_size=batch_size)
    trainer.fit(module, train_dataloaders=loader)
    model.to(device)  # Lightning's teardown parks the module on the CPU; the next shape reuses it here
    return timer.times[args.warmup :], timer.losses[args.warmup :]


def lm_loss(model, batch: dict[str, torch.Tensor], chunked: bool) -> torch.Tensor:
    """The training loss as glmtune's LightningModule computes it (chunked, from the last hidden state), or
    the model's own from the fp32 logits of every position."""
    from glmtune.models.losses import chunked_causal_lm_loss
    from glmtune.training.module import LOSS_CHUNK_TOKENS

    if not chunked:
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    head = model.get_output_embeddings()
    return chunked_causal_lm_loss(out.hidden_states[-1], head, batch["labels"], LOSS_CHUNK_TOKENS)


def loss_parity(
    model, encoder, vocab: int, device, steps: int = 4, seq: int = 512, lr: float = 0.1
) -> tuple[list[float], list[float], float]:
    """The same LoRA steps from the same weights and data, optimised path vs unoptimised path (full fp32
    logits + every block recomputed): (optimised losses, unoptimised losses, relative difference of the first
    step's LoRA gradients). Plain SGD, whose steps are proportional to the gradients: Adam's first steps are
    ~lr * sign(gradient) and would turn rounding noise in near-zero gradients into full-size differences."""
    trained = {k: v for k, v in model.named_parameters() if v.requires_grad}
    start = {k: v.detach().clone() for k, v in trained.items()}
    curves, first_grads = [], []
    for chunked, recompute in ((True, 0), (False, None)):
        with torch.no_grad():
            for k, v in trained.items():
                v.copy_(start[k])
                v.grad = None  # the Trainer leaves its last step's gradients behind
        encoder.checkpoint_layers = recompute
        optimizer = torch.optim.SGD(list(trained.values()), lr=lr)
        g = torch.Generator().manual_seed(1)
        losses = []
        for step in range(steps):
            ids = torch.randint(0, vocab, (1, seq), generator=g).to(device)
            loss = lm_loss(model, {"input_ids": ids, "labels": ids}, chunked)
            loss.backward()
            if step == 0:
                first_grads.append(torch.cat([v.grad.float().flatten() for v in trained.values()]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        curves.append(losses)
    optimised, plain = first_grads
    grad_diff = float((optimised - plain).norm() / plain.norm().clamp_min(1e-30))
    return curves[0], curves[1], grad_diff


def _shape(text: str) -> tuple[int, int]:
    """ "SEQxBATCH" -> (batch, seq)."""
    seq, batch = (int(x) for x in text.split("x"))
    return batch, seq


def profile_step(model, batch_size: int, seq: int, vocab: int, device, rows: int = 25) -> None:
    """The kernels of two training steps (forward, backward, AdamW) at one shape, by device time: where the
    time of glmtune's step goes, for the next optimisation."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def step() -> None:
        batch = random_batch(batch_size, seq, vocab, device)
        lm_loss(model, batch, chunked=True).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, cuBLAS handles
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of 2 glmtune steps at {seq}x{batch_size}:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)


def checkpointed_layers_needed(budget_gib, static_gib, act_gib_per_token_layer, tokens, layers) -> int:
    """Fewest recomputed blocks keeping static + activations under the budget (0 = no recompute)."""
    kept_per_layer = act_gib_per_token_layer * tokens
    for k in range(layers + 1):
        if static_gib + kept_per_layer * (layers - k) <= budget_gib:
            return k
    return layers


def run_glmtune(
    shapes,
    peer: dict[str, Result],
    args,
    device,
    dtype,
    matmul,
    compile_small: bool = False,
    side: str = "glmtune",
    compile_mode: str = "default",
    report=None,
) -> list[Result]:
    from glmtune.training.compile import compile_blocks

    s = chatglm2_shape("host-bound" if args.host_bound else args.tiny)
    model = glmtune_lora_model(s, device, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    encoder = model.base_model.model.transformer.encoder
    layers = s["num_layers"]
    reset_peak(device)
    static = allocated_gib(device)
    act_per_token_layer = None
    results = []
    recomputed: dict[str, int] = {}  # shape -> blocks recomputed in its row
    for batch_size, seq in shapes:
        tokens = batch_size * seq
        name = f"{seq}x{batch_size}"
        budget = peer[name].peak_gib * args.memory_margin if name in peer else float("inf")
        if act_per_token_layer is None or not math.isfinite(budget):
            k = 0
        else:
            k = checkpointed_layers_needed(budget, static, act_per_token_layer, tokens, layers)
        compiled = (
            compile_small and (device.type == "cuda" or args.host_bound) and tokens <= args.compile_max_tokens
        )
        if compile_small and not compiled:
            continue
        r = Result(side, name)
        failure = ""  # a compile that failed: the row then measures eager blocks, and says why
        for attempt in range(2):
            encoder.checkpoint_layers = k
            if compiled:
                compile_blocks(model, compile_mode)  # what train.compile does
            try:
                reset_peak(device)
                times, losses = fit_steps(model, batch_size, seq, s["padded_vocab_size"], args, device)
                r.losses = losses
                fill(r, times, batch_size, seq, s, matmul, device)
                r.note = (
                    f"recompute {k}/{layers} blocks"
                    + (f", compiled ({compile_mode})" if compiled else "")
                    + (f", NOT compiled: {failure}" if failure else "")
                )
            except Exception as err:  # OOM or a compile failure: record it, retry once more conservatively
                r.note = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
                traceback.print_exc()
                if compiled:
                    compiled, failure = False, r.note
                else:
                    k = min(layers, k + max(1, layers // 4))
                continue
            finally:  # back to eager blocks and eager recomputation (compile_blocks replaced both)
                for block in encoder.layers:
                    block._compiled_call_impl = None
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if device.type == "cuda" and k < layers:
                act_per_token_layer = max(0.0, r.peak_gib - static) / (tokens * (layers - k))
            if not math.isfinite(r.peak_gib) or r.peak_gib <= budget or attempt == 1:
                break
            k = min(
                layers, checkpointed_layers_needed(budget, static, act_per_token_layer, tokens, layers) + 1
            )
        results.append(r)
        recomputed[name] = k
        print(row(r), flush=True)
        if report:
            report(r)
    for shape_name in args.profile.split(",") if args.profile and not compile_small else []:
        batch_size, seq = _shape(shape_name)
        encoder.checkpoint_layers = recomputed.get(shape_name, layers)  # as in that shape's row
        profile_step(model, batch_size, seq, s["padded_vocab_size"], device)
    if not compile_small:
        optimised, plain, grad_diff = loss_parity(model, encoder, s["padded_vocab_size"], device)
        r = Result(
            "parity",
            "512x1",
            losses=optimised,
            note="optimised "
            + " ".join(f"{x:.4f}" for x in optimised)
            + " | unoptimised "
            + " ".join(f"{x:.4f}" for x in plain)
            + f" | max diff {max(abs(a - b) for a, b in zip(optimised, plain)):.2e}"
            + f" | first-step gradient rel diff {grad_diff:.2e}",
        )
        print(r.note, flush=True)
        if report:
            report(r)
    del model, encoder
    reset_peak(device)
    return results


def run_v1_memory(args, device, dtype, matmul, report=None) -> list[Result]:
    """ChatGLM-6B LoRA at 128 x 1: peak memory with bf16, int8 and int4 block weights."""
    s = chatglm_v1_shape(args.tiny)
    results = []
    for bits in (0, 8, 4):
        r = Result("glmtune v1", f"128x1 {'bf16' if not bits else f'int{bits}'}")
        try:
            reset_peak(device)
            model = glmtune_lora_model(s, device, dtype, v1=True, bits=bits)
            # As a user short of memory trains: at 128 tokens the blocks' activations (~0.5 GiB) are what
            # decides int4's 5 GiB, beside the weights (4.6 GiB).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            reset_peak(device)
            seq = 128
            ids = torch.randint(0, 130000, (1, seq), device=device)
            ids[0, seq // 2], ids[0, seq // 2 + 1] = 130001, 130004  # [gMASK] <sop>: prompt, then answer
            labels = ids.clone()
            labels[0, : seq // 2 + 1] = -100
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            times, r.losses = plain_loop_steps(
                model,
                optimizer,
                lambda ids=ids, labels=labels: {"input_ids": ids, "labels": labels},
                args,
                device,
                chunked=True,
            )
            r.step_s = sorted(times)[len(times) // 2]
            r.tokens_per_s = seq / r.step_s
            r.peak_gib = peak_gib(device)
            del model, optimizer
        except Exception as err:
            r.note = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
            traceback.print_exc()
        results.append(r)
        print(row(r), flush=True)
        if report:
            report(r)
    return results


# ---------------------------------------------------------------------------------------------- report


HEADER = f"{'side':<12} {'seq x batch':<14} {'tokens/s':>10} {'s/step':>8} {'MFU':>6} {'peak GiB':>9}  note"


def row(r: Result) -> str:
    return (
        f"{r.side:<12} {r.shape:<14} {r.tokens_per_s:>10.0f} {r.step_s:>8.3f} {r.mfu:>6.1%} {r.peak_gib:>9.2f}"
        f"  {r.note}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU check of the script)")
    parser.add_argument(
        "--host-bound",
        action="store_true",
        help="CPU stand-in for 128x1 on a GPU: 28 blocks of hidden 64, one thread, compiled rows too",
    )
    parser.add_argument("--shapes", default="128x1,512x4,1024x8,2048x4", help="seq x batch list")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per shape")
    parser.add_argument(
        "--memory-margin", type=float, default=0.97, help="glmtune's budget = this x peer peak"
    )
    parser.add_argument(
        "--compile-max-tokens",
        type=int,
        default=1 << 30,
        help="the torch.compile rows: only shapes of up to this many tokens (default: all)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="train.compile_mode of the glmtune+compile rows (reduce-overhead: CUDA graphs too)",
    )
    parser.add_argument(
        "--cudagraph-shapes",
        default="128x1",
        help="shapes of the glmtune+cudagraphs rows (compile_mode reduce-overhead; CUDA; '' for none)",
    )
    parser.add_argument(
        "--profile",
        default="",
        help="SEQxBATCH[,SEQxBATCH...]: also print the top kernels of glmtune's step at these shapes",
    )
    parser.add_argument(
        "--skip", default="", help="comma list of parts to skip: peer,glmtune,v1,compile,cudagraphs"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.host_bound:
        args.tiny = True  # CPU, fp32
        args.shapes = "128x1"
        args.skip += ",v1"
        torch.set_num_threads(1)  # one thread issuing ops, as a GPU's host does

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu-{platform.machine()}"
    shapes = [_shape(name) for name in args.shapes.split(",")]  # (batch, seq)
    if args.tiny and not args.host_bound:
        shapes = [(b, min(s, 64)) for b, s in shapes[:2]]
    torch.manual_seed(0)
    matmul = measure_matmul_flops(device, args.tiny)
    print(
        f"card: {card}; torch {torch.__version__}; measured matmul: {matmul / 1e12:.1f} TFLOP/s", flush=True
    )
    print(HEADER, flush=True)
    skip = set(args.skip.split(","))
    results: list[Result] = []
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"gpu_lora-{card.replace(' ', '_')}{'-host-bound' if args.host_bound else ''}.json"

    def save(r: Result | None = None) -> None:
        """Rewrite the JSON after every row, so a run stopped early keeps what it measured."""
        if r is not None:
            results.append(r)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "card": card,
                    "torch": torch.__version__,
                    "matmul_flops": matmul,
                    "seconds": time.time() - started,
                    "results": [x.__dict__ for x in results],
                },
                indent=2,
            )
        )
        tmp.replace(file)

    peer = run_peer(shapes, args, device, dtype, matmul, report=save) if "peer" not in skip else []
    peer_by_shape = {r.shape: r for r in peer}
    if "glmtune" not in skip:
        run_glmtune(shapes, peer_by_shape, args, device, dtype, matmul, report=save)
    if "v1" not in skip:
        run_v1_memory(args, device, dtype, matmul, report=save)
    # CUDA graphs (train.compile_mode: reduce-overhead) where launches dominate: the small shapes. Before the
    # compiled rows at every shape: the 128x1 goal (x5) likely needs it.
    if "cudagraphs" not in skip and device.type == "cuda" and not args.no_compile and args.cudagraph_shapes:
        run_glmtune(
            [_shape(name) for name in args.cudagraph_shapes.split(",")],
            peer_by_shape,
            args,
            device,
            dtype,
            matmul,
            compile_small=True,
            side="glmtune+cudagraphs",
            compile_mode="reduce-overhead",
            report=save,
        )

    # Last, as it takes a while to compile (a graph per block kind and shape kind): glmtune with train.compile
    # at every shape. Cut short by the session's time limit, the rows measured so far are already saved.
    if "compile" not in skip and (device.type == "cuda" or args.host_bound) and not args.no_compile:
        run_glmtune(
            shapes,
            peer_by_shape,
            args,
            device,
            dtype,
            matmul,
            compile_small=True,
            side="glmtune+compile",
            compile_mode=args.compile_mode,
            report=save,
        )
    print(f"\n{HEADER}")
    by = {(r.side, r.shape): r for r in results}
    for r in results:
        print(row(r))
    print("\nglmtune / peer at the same shape (tokens/s ratio, peak memory ratio):")
    for batch_size, seq in shapes:
        name = f"{seq}x{batch_size}"
        b = by.get(("peer", name))
        for side in ("glmtune", "glmtune+compile", "glmtune+cudagraphs"):
            a = by.get((side, name))
            if a and b:
                print(
                    f"  {side:<16} {name:<10} speed x{a.tokens_per_s / b.tokens_per_s:.2f}   "
                    f"memory x{a.peak_gib / b.peak_gib:.2f}"
                )
    save()
    print(f"wrote {file} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
