"""Reading checkpoint files tensor by tensor: safetensors and `.bin` shards, and P-Tuning v2 prefix weights.

Each tensor is read into memory of its own, in the dtype the caller asks for. Safetensors files are read with
plain file reads, not memory-mapped, converting through a small staging buffer; `.bin` shards are read one at
a time. Nothing returned points into a checkpoint file, so the folder a model came from can be overwritten
while the model lives.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from glmtune.config import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint folder that cannot be loaded as asked (wrong family, truncated or foreign files, missing
    tensors): the user's to fix, so the scripts print it as an error line naming the file."""


# (tensor name, dtype stored in the checkpoint) -> dtype to load it in
DtypeFor = Callable[[str, torch.dtype], torch.dtype]
# Conversion while reading safetensors goes through a buffer of this size, not a full-size copy.
STAGING_BYTES = 16 * 1024**2

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
