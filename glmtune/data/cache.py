"""The records' cache key, and their folder on disk: reused while the key matches, replaced atomically.

The key hashes everything the records depend on: the build code's version, the tokenizer, the template's
rendering, the settings that change the records and the data files' contents. It is written last, as
build_key.json, so a folder with a matching key is complete. A build writes into `.{name}.tmp-*` beside the
folder and renames it into place at the end, so a killed build never leaves half-written records where
training reads them; it holds a lock file (`.{name}.lock`) so that concurrent builds (e.g. every DDP rank) run
one at a time and the later ones find the records up to date.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from glmtune.data.records import read_meta
from glmtune.data.samples import Template, template_fingerprint, template_name
from glmtune.data.settings import BuildSettings, LengthSettings

# Bump when the build code changes the records a given key produces (2: "chatglm3" is the chat format; 3: the
# key holds the template's rendering of PROBE_DIALOGUE).
BUILD_VERSION = 3
KEY_FILE = "build_key.json"
REPORT_FILE = "report.json"


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """Content hash of a data file (the whole content: size and mtime alone can miss an edit)."""
    path = Path(path)
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"path": str(path), "size": path.stat().st_size, "sha256": digest}


@dataclass
class BuildKey:
    """What the records are built from: `settings` (hashed into `digest`) and the data `files` (path, size,
    content hash; only the hashes are in `settings`, so moving a file does not force a rebuild)."""

    settings: dict[str, Any]
    files: dict[str, list[dict[str, Any]]]

    @classmethod
    def of(
        cls, settings: BuildSettings, lengths: LengthSettings, template: Template, tokenizer_fingerprint: str
    ) -> BuildKey:
        files = {
            "train": [file_digest(f) for f in settings.train_files],
            "eval": [file_digest(f) for f in settings.eval_files],
        }
        s = settings
        key_settings: dict[str, Any] = {
            "build_version": BUILD_VERSION,
            "tokenizer": tokenizer_fingerprint,
            "template": template_name(template),
            "template_rendering": template_fingerprint(template, s.multi_turn),
            "format": s.format,
            **asdict(lengths),
            # settings that do not matter for the strategy in use must not force a rebuild
            "stride": s.stride if s.strategy == "slide" else None,
            "ensure_answer_min_length": s.ensure_answer_min_length if s.strategy == "truncate" else None,
            "multi_turn": s.multi_turn,
            "packing": s.packing,
            "backend": s.backend,
            "shuffle": s.shuffle,
            "eval_ratio": s.eval_ratio,
            "seed": s.seed if (s.shuffle or s.eval_ratio) else None,
            "on_error": s.on_error,
            "train_files": [f["sha256"] for f in files["train"]],
            "eval_files": [f["sha256"] for f in files["eval"]],
        }
        return cls(key_settings, files)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()

    def write(self, folder: Path) -> None:
        record = {"key": self.digest, "settings": self.settings, "files": self.files}
        (folder / KEY_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def rebuild_reasons(out_dir: Path, key: BuildKey, with_eval: bool, force: bool) -> list[str]:
    """Why the records in `out_dir` must be (re)built; [] when they are up to date. Refuses to replace a
    folder that holds something else."""
    key_file = out_dir / KEY_FILE
    try:
        previous = json.loads(key_file.read_text(encoding="utf-8")) if key_file.is_file() else None
    except (OSError, ValueError):
        previous = {"key": None}  # unreadable: rebuild
    if previous and previous.get("key") == key.digest and not force and _is_complete(out_dir, with_eval):
        return []
    if out_dir.exists() and previous is None and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a glmtune records folder; refusing to replace it")
    if previous is None:
        return ["no records built yet"]
    if force:
        return ["force=True"]
    if "settings" not in previous:
        return ["previous build key unreadable"]
    if previous.get("key") == key.digest:
        return ["previous records incomplete"]
    return _describe_changes(previous.get("settings", {}), key.settings, previous.get("files", {}), key.files)


def _describe_changes(
    old: dict[str, Any], new: dict[str, Any], old_files: dict, new_files: dict
) -> list[str]:
    reasons = []
    for kind in ("train", "eval"):
        before, after = old_files.get(kind, []), new_files.get(kind, [])
        if [f["path"] for f in before] != [f["path"] for f in after]:
            reasons.append(f"{kind} files: {[f['path'] for f in before]} -> {[f['path'] for f in after]}")
        for b, a in zip(before, after):
            if b["path"] == a["path"] and b["sha256"] != a["sha256"]:
                reasons.append(f"{kind} file {a['path']} changed")
    for name in sorted(set(old) | set(new)):
        if name in ("train_files", "eval_files"):
            continue
        if old.get(name) != new.get(name):
            reasons.append(f"{name}: {old.get(name)!r} -> {new.get(name)!r}")
    return reasons or ["build key changed"]


def _is_complete(out_dir: Path, with_eval: bool) -> bool:
    try:
        read_meta(out_dir / "train")
        if with_eval:
            read_meta(out_dir / "eval")
    except (FileNotFoundError, ValueError):
        return False
    return (out_dir / REPORT_FILE).is_file()


@contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold the records folder's lock; any temp or old folder of a build found then was left by a killed one,
    and is removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            for stale in itertools.chain(
                out_dir.parent.glob(f".{out_dir.name}.tmp-*"), out_dir.parent.glob(f".{out_dir.name}.old-*")
            ):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def replacing(out_dir: Path) -> Iterator[Path]:
    """A temp folder (not yet created) to build into, beside `out_dir`; moved into its place when the block
    ends normally, removed when it raises. Call under `locked(out_dir)`."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        _fsync_dir(tmp)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
