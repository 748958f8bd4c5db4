"""Tokenized samples on disk: two backends behind one writer / reader API.

A record is a dict of equally long int32 arrays (`input_ids`, `labels`, and for packed data `position_ids`,
`seq_ids`); a records folder holds one split. Stored per record: the fields concatenated in `fields` order.

- `record`: `data.bin` (all records back to back, int32) + `index.bin` (int64 offsets, n + 1 of them, in
  elements) read through numpy memmaps: random access without loading, cheap to open in every process.
- `lmdb`: one LMDB environment (`data.mdb`, key = record number as 8 big-endian bytes); the map size grows
  when full; for data sets too large for one flat file on some file systems, or many small files.

Both write `meta.json` last (its presence marks a complete folder), may carry `order.npy` (a permutation:
shuffled reading order without moving the data), and open their files lazily, once per process, so a
reader can be pickled into DataLoader workers or used after fork.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

Backend = Literal["record", "lmdb"]
BACKENDS: tuple[str, ...] = ("record", "lmdb")
DTYPE = np.int32
META = "meta.json"
ORDER = "order.npy"
FORMAT_VERSION = 1


def _pack(record: Mapping[str, Any], fields: Sequence[str]) -> tuple[np.ndarray, int]:
    arrays = [np.asarray(record[f], dtype=DTYPE) for f in fields]
    n = len(arrays[0])
    if any(a.ndim != 1 or len(a) != n for a in arrays):
        raise ValueError(f"record fields {list(fields)} must be 1-D arrays of equal length")
    return np.concatenate(arrays), n


def _unpack(flat: np.ndarray, fields: Sequence[str]) -> dict[str, np.ndarray]:
    n = len(flat) // len(fields)
    return {f: flat[i * n : (i + 1) * n] for i, f in enumerate(fields)}


class RecordWriter:
    """Streams records into a new folder; `close()` writes `meta.json`. Use as a context manager."""

    backend: str

    def __init__(self, path: str | os.PathLike, fields: Sequence[str]):
        self.path = Path(path)
        self.fields = tuple(fields)
        self.num_records = 0
        self.num_tokens = 0
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / META).exists():
            raise FileExistsError(f"{self.path} already holds records")

    def write(self, record: Mapping[str, Any]) -> None:
        flat, n = _pack(record, self.fields)
        self.write_flat(flat, n)

    def write_flat(self, flat: np.ndarray, n: int) -> None:
        """Write a record given as its stored form: the `fields` of `n` tokens each, concatenated (int32)."""
        if flat.dtype != DTYPE or flat.ndim != 1 or len(flat) != n * len(self.fields):
            raise ValueError(
                f"a flat record must be 1-D int32 of {len(self.fields)} x {n} values, "
                f"got {flat.dtype} {flat.shape}"
            )
        self._write(flat, n)
        self.num_records += 1
        self.num_tokens += n

    def write_many(self, flat: np.ndarray, sizes: np.ndarray) -> None:
        """Write records given back to back in their stored form: record i is the `fields` of `sizes[i]` tokens
        each, concatenated, and `flat` holds them all in order (int32)."""
        sizes = np.asarray(sizes, np.int64)
        total = int(sizes.sum()) * len(self.fields)
        if flat.dtype != DTYPE or flat.ndim != 1 or len(flat) != total:
            raise ValueError(
                f"records of {sizes.sum()} tokens in {len(self.fields)} fields need 1-D int32 of {total} "
                f"values, got {flat.dtype} {flat.shape}"
            )
        self._write_many(flat, sizes)

    def _write_many(self, flat: np.ndarray, sizes: np.ndarray) -> None:
        ends = np.cumsum(sizes * len(self.fields))
        for n, start, end in zip(sizes.tolist(), (ends - sizes * len(self.fields)).tolist(), ends.tolist()):
            self.write_flat(flat[start:end], n)

    def _write(self, flat: np.ndarray, n: int) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._finish()
        meta = {
            "format": "glmtune-records",
            "version": FORMAT_VERSION,
            "backend": self.backend,
            "fields": list(self.fields),
            "dtype": "int32",
            "num_records": self.num_records,
            "num_tokens": self.num_tokens,
        }
        (self.path / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    def abort(self) -> None:
        """Release the files without marking the folder complete."""
        self._finish()

    def __len__(self) -> int:
        return self.num_records

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class FlatRecordWriter(RecordWriter):
    backend = "record"

    def __init__(self, path: str | os.PathLike, fields: Sequence[str]):
        super().__init__(path, fields)
        self._data = open(self.path / "data.bin", "wb")
        self._index = open(self.path / "index.bin", "wb")
        self._offset = 0
        self._index.write(np.int64(0).tobytes())

    def _write(self, flat: np.ndarray, n: int) -> None:
        self._data.write(flat.tobytes())
        self._offset += len(flat)
        self._index.write(np.int64(self._offset).tobytes())

    def _write_many(self, flat: np.ndarray, sizes: np.ndarray) -> None:
        # One write for the data and one for the index, whatever the number of records.
        self._data.write(flat.tobytes())
        self._index.write((self._offset + np.cumsum(sizes * len(self.fields))).astype(np.int64).tobytes())
        self._offset += len(flat)
        self.num_records += len(sizes)
        self.num_tokens += int(sizes.sum())

    def _finish(self) -> None:
        for f in (self._data, self._index):
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()


class LmdbRecordWriter(RecordWriter):
    backend = "lmdb"

    def __init__(
        self,
        path: str | os.PathLike,
        fields: Sequence[str],
        map_size: int = 1 << 26,
        commit_every: int = 1000,
    ):
        import lmdb

        super().__init__(path, fields)
        self._lmdb = lmdb
        self._env = lmdb.open(str(self.path), map_size=map_size, subdir=True, sync=False, metasync=False)
        self._batch: list[tuple[bytes, bytes]] = []
        self._commit_every = commit_every
        self._lengths = open(self.path / "lengths.bin", "wb")

    def _write(self, flat: np.ndarray, n: int) -> None:
        self._batch.append((self.num_records.to_bytes(8, "big"), flat.tobytes()))
        self._lengths.write(np.int32(n).tobytes())
        if len(self._batch) >= self._commit_every:
            self._commit()

    def _commit(self) -> None:
        while self._batch:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in self._batch:
                        txn.put(key, value)
                self._batch = []
            except self._lmdb.MapFullError:
                # The transaction was aborted: grow the map and write the whole batch again.
                self._env.set_mapsize(self._env.info()["map_size"] * 2)

    def _finish(self) -> None:
        if self._env is not None:
            self._commit()
            self._env.sync(True)
            self._env.close()
            self._env = None
        if not self._lengths.closed:
            self._lengths.close()


def open_writer(
    path: str | os.PathLike, *, fields: Sequence[str], backend: Backend = "record", **kwargs: Any
) -> RecordWriter:
    """A writer for a new records folder `path`. `kwargs` go to the backend (lmdb: map_size, commit_every)."""
    if backend == "record":
        return FlatRecordWriter(path, fields, **kwargs)
    if backend == "lmdb":
        return LmdbRecordWriter(path, fields, **kwargs)
    raise ValueError(f"unknown records backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete records folder (no {META})")
    return json.loads(meta_file.read_text(encoding="utf-8"))


def write_order(path: str | os.PathLike, order: np.ndarray) -> None:
    """Store a reading order (a permutation of range(num_records)) for a complete records folder."""
    n = read_meta(path)["num_records"]
    order = np.asarray(order, dtype=np.int64)
    if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError("order must be a permutation of range(num_records)")
    np.save(Path(path) / ORDER, order)


class RecordReader:
    """Random access to a records folder: `reader[i]` -> dict of int32 arrays. Files open on first use in
    each process (the pid is checked), and pickling drops the handles."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.fields: tuple[str, ...] = tuple(self.meta["fields"])
        self.num_records: int = self.meta["num_records"]
        self._pid: int | None = None
        self._order: np.ndarray | None = None

    def _open(self) -> None:
        order_file = self.path / ORDER
        self._order = np.load(order_file, mmap_mode="r") if order_file.exists() else None
        self._open_backend()
        self._pid = os.getpid()

    def _open_backend(self) -> None:
        raise NotImplementedError

    def _read(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _ensure_open(self) -> None:
        if self._pid != os.getpid():
            self._open()

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -self.num_records <= i < self.num_records:
            raise IndexError(f"record {i} out of range ({self.num_records} records)")
        self._ensure_open()
        i = int(i) % self.num_records
        if self._order is not None:
            i = int(self._order[i])
        return _unpack(self._read(i), self.fields)

    def stored(self, i: int) -> dict[str, np.ndarray]:
        """Record `i` in the order it was written (the data files' order), whatever the reading order."""
        if not 0 <= i < self.num_records:
            raise IndexError(f"record {i} out of range ({self.num_records} records)")
        self._ensure_open()
        return _unpack(self._read(int(i)), self.fields)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per record, in reading order."""
        self._ensure_open()
        lengths = self._raw_lengths()
        return lengths[self._order] if self._order is not None else lengths

    def _raw_lengths(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        self._pid = None
        self._order = None

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        state["_pid"] = None
        state["_order"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class FlatRecordReader(RecordReader):
    def _open_backend(self) -> None:
        data_file = self.path / "data.bin"
        # np.memmap refuses empty files.
        self._data = (
            np.memmap(data_file, dtype=DTYPE, mode="r") if data_file.stat().st_size else np.empty(0, DTYPE)
        )
        self._index = np.memmap(self.path / "index.bin", dtype=np.int64, mode="r")

    def _read(self, i: int) -> np.ndarray:
        return np.array(self._data[self._index[i] : self._index[i + 1]])

    def _raw_lengths(self) -> np.ndarray:
        return (np.diff(self._index) // len(self.fields)).astype(np.int64)

    def close(self) -> None:
        super().close()
        self.__dict__.pop("_data", None)
        self.__dict__.pop("_index", None)


# One read-only environment per (process, data file): py-lmdb refuses to open the same files twice in one
# process, and an environment must not be used across fork(), so a child closes its inherited copy first.
_LMDB_ENVS: dict[tuple[int, int], tuple[int, Any]] = {}


def _lmdb_env(path: Path) -> Any:
    import lmdb

    stat = os.stat(path / "data.mdb")
    key, pid = (stat.st_dev, stat.st_ino), os.getpid()
    if key in _LMDB_ENVS:
        owner, env = _LMDB_ENVS.pop(key)
        if owner == pid:
            _LMDB_ENVS[key] = (owner, env)
            return env
        env.close()  # inherited through fork: unmaps only this process's copy
    # No lock file (read-only), no readahead (random access).
    env = lmdb.open(
        str(path), readonly=True, lock=False, readahead=False, meminit=False, subdir=True, max_readers=512
    )
    _LMDB_ENVS[key] = (pid, env)
    return env


class LmdbRecordReader(RecordReader):
    def _open_backend(self) -> None:
        self._env = _lmdb_env(self.path)

    def _read(self, i: int) -> np.ndarray:
        with self._env.begin(buffers=False) as txn:
            value = txn.get(i.to_bytes(8, "big"))
        if value is None:
            raise KeyError(f"{self.path}: record {i} missing")
        return np.frombuffer(value, dtype=DTYPE).copy()

    def _raw_lengths(self) -> np.ndarray:
        return np.fromfile(self.path / "lengths.bin", dtype=np.int32).astype(np.int64)

    def close(self) -> None:
        super().close()
        self.__dict__.pop("_env", None)  # shared with other readers of these files in this process


def open_reader(path: str | os.PathLike) -> RecordReader:
    """A reader for a complete records folder; the backend is read from its `meta.json`."""
    backend = read_meta(path)["backend"]
    if backend == "record":
        return FlatRecordReader(path)
    if backend == "lmdb":
        return LmdbRecordReader(path)
    raise ValueError(f"{path}: unknown records backend {backend!r}")
