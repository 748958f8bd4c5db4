"""Peak memory of `glmtune.load_model` on a synthetic ChatGLM2-shaped checkpoint of >= 1 GB.

Writes a random fp16 checkpoint in the published layout (config.json + sharded safetensors with an index, and
the same weights as sharded pytorch_model-*.bin) shard by shard, so writing never holds the whole model. Then,
for each format, a fresh Python process imports torch and glmtune, records its resident memory, resets the
kernel's peak-RSS counter (/proc/self/clear_refs), runs `load_model(path, torch_dtype=torch.float16)` and
reads the peak (VmHWM). The table reports that peak minus the pre-load RSS, as a ratio to the checkpoint's
size on disk; the goal is <= 1.3 (one copy of the weights plus a little).

    .venv/bin/python bench/load_memory.py                 # ~1.2 GB checkpoint in a temp dir, removed after
    .venv/bin/python bench/load_memory.py --layers 16     # bigger
    .venv/bin/python bench/load_memory.py --dir /data/ck  # keep the checkpoint there (reused if present)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def checkpoint_config(layers: int) -> dict:
    """ChatGLM2-6B's published config with a narrower network (hidden 2048, 16 heads, 2 KV groups)."""
    return {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": 5504,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": 2048,
        "kv_channels": 128,
        "layernorm_epsilon": 1e-05,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "num_attention_heads": 16,
        "num_layers": layers,
        "original_rope": True,
        "padded_vocab_size": 65024,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 32768,
        "use_cache": True,
        "torch_dtype": "float16",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every checkpoint tensor, from the model built on the meta device (no memory)."""
    import torch

    from glmtune.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration

    with torch.device("meta"):
        model = ChatGLM2ForConditionalGeneration(ChatGLM2Config(**config))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_checkpoint(folder: Path, layers: int, shard_bytes: int, seed: int = 0) -> int:
    """Random fp16 weights as sharded safetensors and .bin files (same shards); returns the weights' bytes."""
    import torch
    from safetensors.torch import save_file

    config = checkpoint_config(layers)
    shapes = tensor_shapes(config)
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    # Consecutive tensors into shards of at most shard_bytes (a bigger tensor gets a shard of its own), the
    # way transformers' save_pretrained(max_shard_size=...) splits the published checkpoints.
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes

    generator = torch.Generator().manual_seed(seed)
    weight_maps: dict[str, dict[str, str]] = {"safetensors": {}, "bin": {}}
    for kind in weight_maps:
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for i, names in enumerate(groups, 1):
        shard = {}
        for name in names:
            std = 1.0 if name.endswith("layernorm.weight") else 0.02
            shard[name] = (torch.randn(shapes[name], generator=generator) * std).half()
        st_file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        bin_file = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
        save_file(shard, str(folder / "safetensors" / st_file), metadata={"format": "pt"})
        torch.save(shard, folder / "bin" / bin_file)
        weight_maps["safetensors"].update(dict.fromkeys(names, st_file))
        weight_maps["bin"].update(dict.fromkeys(names, bin_file))
        del shard
    for kind, index in (
        ("safetensors", "model.safetensors.index.json"),
        ("bin", "pytorch_model.bin.index.json"),
    ):
        index_data = {"metadata": {"total_size": total}, "weight_map": weight_maps[kind]}
        (folder / kind / index).write_text(json.dumps(index_data, indent=2) + "\n")
        (folder / kind / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return total


def measure(path: str, dtype: str) -> None:
    """(Child process) Load `path` and print peak RSS above the pre-load RSS as one JSON line."""
    import torch

    import glmtune
    import glmtune.models.chatglm2  # noqa: F401 - imported before the baseline, like torch
    import glmtune.models.quantization  # noqa: F401

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    start = time.perf_counter()
    model = glmtune.load_model(path, torch_dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    param_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    after = status("VmRSS")
    print(
        json.dumps(
            {
                "before": before,
                "peak": peak,
                "after": after,
                "seconds": seconds,
                "param_bytes": param_bytes,
                "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            }
        )
    )


def run_child(path: Path, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", str(path), "--dtype", dtype],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8, help="GLM blocks (8: 1.23 GB in fp16)")
    parser.add_argument("--shard-mb", type=int, default=300, help="largest shard (the published ones: ~2000)")
    parser.add_argument("--dir", type=Path, default=None, help="keep the checkpoint here (default: temp dir)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.dtype)
        return

    sys.path.insert(0, str(REPO))
    folder = args.dir or Path(tempfile.mkdtemp(prefix="glmtune-load-memory-"))
    try:
        if not (folder / "safetensors" / "config.json").is_file():
            print(
                f"writing a {args.layers}-layer ChatGLM2-shaped fp16 checkpoint to {folder} ...", flush=True
            )
            write_checkpoint(folder, args.layers, args.shard_mb * 1024**2)
        rows = []
        # fp16 -> fp16 keeps the tensors as read; fp16 -> bf16 converts each one (the path of a dtype change).
        for kind, dtype in (
            ("safetensors", "float16"),
            ("bin", "float16"),
            ("safetensors", "bfloat16"),
            ("bin", "bfloat16"),
        ):
            sub = folder / kind
            files = [f for f in sub.iterdir() if f.suffix in (".safetensors", ".bin")]
            on_disk = sum(f.stat().st_size for f in files)
            largest = max(f.stat().st_size for f in files)
            result = run_child(sub, dtype)
            rows.append((f"{len(files)} x .{kind} -> {dtype}", on_disk, largest, result))
        gb = 1024**3
        header = (
            f"{'checkpoint -> torch_dtype':<28} {'size':>7} {'largest':>8} {'params':>7} {'peak RSS +':>10} "
            f"{'ratio':>6} {'RSS after +':>11} {'load s':>7}"
        )
        print(header)
        print("-" * len(header))
        for label, on_disk, largest, result in rows:
            increase = result["peak"] - result["before"]
            print(
                f"{label:<28} {on_disk / gb:>5.2f}GB {largest / gb:>6.2f}GB {result['param_bytes'] / gb:>5.2f}GB "
                f"{increase / gb:>8.2f}GB {increase / on_disk:>6.2f} "
                f"{(result['after'] - result['before']) / gb:>9.2f}GB {result['seconds']:>7.1f}"
            )
        print("goal: ratio <= 1.3 (peak RSS increase while loading / checkpoint size)")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
