"""Preference pairs (a prompt with a chosen and a rejected answer) -> records for preference training (DPO).

Formats, decided per record from its keys:

- `{"prompt", "chosen", "rejected"}` with strings (TRL's format), optional `system`; or TRL's conversational
  form: `prompt` a list of `{"role", "content"}` messages ending with the user's, each answer a string or one
  `{"role": "assistant", "content"}` message;
- alpaca style `{"instruction", "input", "chosen", "rejected", "history": [[q, a], ...], "system"}`;
- a dialogue so far plus the two answers to its last user message: ShareGPT's
  `{"conversations": [{"from": "system"|"human"|"gpt", "value"}...], "chosen", "rejected"}` or OpenAI's
  `{"messages": [{"role": "system"|"user"|"assistant", "content"}...], "chosen", "rejected"}`, as the
  supervised `conversations` format writes dialogues, but ending with the user's message.

A bad record raises `DataError` with FILE:LINE and the field, as supervised data does. Both answers are
rendered after the same chat prompt by the template (`build_train_sample`), so the model is trained on the
prompts it will be chatted with. A pair too long for `max_seq_length` loses prompt tokens first (from the
side `truncate_side` names, the template's protected tokens kept), and its answers only when the prompt alone
cannot make room; both answers are always kept (each keeps its end-of-answer token).

A record stores the prompt once: `input_ids` is prompt + chosen answer + rejected answer, `labels` the answer
tokens (-100 on the prompt), and `part` says which of the three each token belongs to (`PROMPT`, `CHOSEN`,
`REJECTED`). `PairCollator` unfolds a batch of them into one batch of 2B sequences, the B chosen ones first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmtune.data.cache import REPORT_FILE, file_digest, locked, replacing
from glmtune.data.dataset import Collator
from glmtune.data.readers import _ROLES, DataError, _answer, _get, _text, iter_json_records
from glmtune.data.records import open_writer, read_meta, write_order
from glmtune.data.samples import IGNORE_INDEX, Template, supervised_spans, template_fingerprint
from glmtune.data.settings import BuildSettings, LengthSettings

PROMPT, CHOSEN, REJECTED = 0, 1, 2
PAIR_FIELDS = ("input_ids", "labels", "part")
# Part of the records' cache key: records built by another stage (or an older layout) are never reused.
PAIR_BUILD_VERSION = "dpo-1"
PAIR_KEY_FILE = "build_key.json"


@dataclass
class PreferencePair:
    """One preference example: the query (after `history` turns and an optional system prompt) and two answers."""

    query: str
    chosen: str
    rejected: str
    history: list[tuple[str, str]]
    system: str | None
    source: str


def parse_preference(obj: Any, src: str) -> PreferencePair:
    """A decoded record -> `PreferencePair`; `src` is "FILE:LINE" for messages."""
    if not isinstance(obj, dict):
        raise DataError(src, f"expected a JSON object, got {type(obj).__name__}")
    if "chosen" not in obj or "rejected" not in obj:
        missing = "chosen" if "chosen" not in obj else "rejected"
        raise DataError(src, "missing (a preference pair needs chosen and rejected answers)", missing)
    chosen = _answer(_assistant_message(obj["chosen"], src, "chosen"), src, "chosen")
    rejected = _answer(_assistant_message(obj["rejected"], src, "rejected"), src, "rejected")
    system = _get(obj, "system", src, required=False) or None
    history: list[tuple[str, str]] = []
    if "instruction" in obj:
        instruction = _get(obj, "instruction", src)
        extra = _get(obj, "input", src, required=False) or ""
        query = f"{instruction}\n{extra}" if extra else instruction
        for i, pair in enumerate(_get(obj, "history", src, kind=list, required=False) or []):
            if not (isinstance(pair, list | tuple) and len(pair) == 2):
                raise DataError(src, "expected a [query, answer] pair", f"history[{i}]")
            history.append(
                (_text(pair[0], src, f"history[{i}][0]"), _answer(pair[1], src, f"history[{i}][1]"))
            )
    elif isinstance(obj.get("prompt"), list):
        query, history, system = _conversation_prompt(obj["prompt"], src, system)
    elif "prompt" in obj:
        query = _get(obj, "prompt", src)
    elif "conversations" in obj or "messages" in obj:
        name, role_key, text_key = (
            ("conversations", "from", "value") if "conversations" in obj else ("messages", "role", "content")
        )
        messages = _get(obj, name, src, kind=list)
        if not messages:
            raise DataError(src, "empty list", name)
        query, history, system = _conversation_prompt(messages, src, system, name, role_key, text_key)
    else:
        raise DataError(
            src, "missing (give `prompt`, alpaca's `instruction`, or `conversations` / `messages`)", "prompt"
        )
    return PreferencePair(query, chosen, rejected, history, system, src)


def _assistant_message(value: Any, src: str, name: str) -> Any:
    """An answer given as TRL's conversational `[{"role": "assistant", "content": ...}]`, or as it is."""
    if not (isinstance(value, list) and value and all(isinstance(m, dict) for m in value)):
        return value
    if len(value) != 1 or value[0].get("role") != "assistant" or "content" not in value[0]:
        raise DataError(src, 'expected one {"role": "assistant", "content": ...} message', name)
    return value[0]["content"]


def _conversation_prompt(
    messages: list,
    src: str,
    system: str | None,
    name: str = "prompt",
    role_key: str = "role",
    text_key: str = "content",
) -> tuple[str, list[tuple[str, str]], str | None]:
    """A dialogue so far (an optional system message, then user / assistant turns ending with a user message),
    as TRL's conversational `prompt`, `messages` or ShareGPT's `conversations` (`from` / `value`, roles human
    and gpt) -> (query, history, system). Errors name the list `name` and the message's index."""
    turns: list[tuple[str, str]] = []
    query: str | None = None
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict) or role_key not in message or text_key not in message:
            raise DataError(src, f'expected a {{"{role_key}", "{text_key}"}} message', where)
        given = message[role_key]
        role = _ROLES.get(given) if isinstance(given, str) else None
        content = _text(message[text_key], src, f"{where}.{text_key}")
        if role == "system" and i == 0:
            system = content or None
        elif role == "user" and query is None:
            query = content
        elif role == "assistant" and query is not None:
            turns.append((query, _answer(content, src, f"{where}.{text_key}")))
            query = None
        else:
            raise DataError(
                src,
                f"unexpected role {given!r} here (system first, then user / assistant turns)",
                f"{where}.{role_key}",
            )
    if query is None:
        raise DataError(
            src, "the prompt's last message must be the user's (chosen and rejected answer it)", name
        )
    return query, turns, system


def iter_pairs(path: str | Path) -> Iterator[PreferencePair]:
    """The pairs of one JSON lines or JSON array file; raises the DataError of the first bad record."""
    for item in iter_json_records(path):
        if isinstance(item, DataError):
            raise item
        lineno, obj, raw = item
        try:
            yield parse_preference(obj, f"{path}:{lineno}")
        except DataError as err:
            err.raw = raw
            raise


def pair_sample(pair: PreferencePair, template: Template) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen answer ids, rejected answer ids) as the template renders them."""
    kwargs: dict[str, Any] = {"system": pair.system} if pair.system else {}
    history = pair.history or None
    rendered = []
    for answer in (pair.chosen, pair.rejected):
        ids, labels = template.build_train_sample(pair.query, answer, history=history, **kwargs)
        start = supervised_spans(labels)[-1][0]
        rendered.append((list(ids[:start]), list(ids[start:])))
    (prompt, chosen), (other_prompt, rejected) = rendered
    if prompt != other_prompt:
        raise DataError(pair.source, "the template renders the prompt differently for the two answers")
    return prompt, chosen, rejected


def fit_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], s: LengthSettings
) -> tuple[list[int], list[int], list[int]]:
    """Make prompt + the longer answer fit `s.max_seq_length`: answers capped at `max_target_length`, then
    prompt tokens cut (outside its protected head and tail), then the answers cut (each keeps its last token)."""

    def cap(answer: list[int], n: int) -> list[int]:
        return answer if len(answer) <= n else answer[: n - 1] + answer[-1:]

    if s.max_target_length is not None:
        chosen, rejected = cap(chosen, s.max_target_length), cap(rejected, s.max_target_length)
    limit, longest = s.max_seq_length, max(len(chosen), len(rejected))
    if len(prompt) + longest > limit:
        head = min(s.protected_head, len(prompt))
        tail = min(s.protected_tail, len(prompt) - head)
        keep = max(head + tail, limit - longest)
        r = len(prompt) - keep
        if r > 0:
            start = head if s.truncate_side == "prompt_head" else len(prompt) - tail - r
            prompt = prompt[:start] + prompt[start + r :]
        room = limit - len(prompt)
        chosen, rejected = cap(chosen, room), cap(rejected, room)
    return prompt, chosen, rejected


def pair_record(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict[str, np.ndarray]:
    ids = prompt + chosen + rejected
    labels = [IGNORE_INDEX] * len(prompt) + chosen + rejected
    part = [PROMPT] * len(prompt) + [CHOSEN] * len(chosen) + [REJECTED] * len(rejected)
    return {"input_ids": np.array(ids), "labels": np.array(labels), "part": np.array(part)}


@dataclass
class PairRecords:
    train_dir: Path
    eval_dir: Path | None
    train_pairs: int
    eval_pairs: int
    reused: bool


def build_pair_records(
    settings: BuildSettings, template: Template, tokenizer_fingerprint: str, say: Any = print
) -> PairRecords:
    """Build (or reuse, while its cache key matches) the pair records of `settings` in `settings.out_dir`."""
    if settings.packing:
        raise DataError("data.packing", "preference pairs cannot be packed: set data.packing false")
    if settings.eval_ratio:
        raise DataError("data.eval_ratio", "preference training takes its eval pairs from data.eval_files")
    lengths = settings.lengths_for(template)
    key = {
        "build_version": PAIR_BUILD_VERSION,
        "stage": "dpo",
        "tokenizer": tokenizer_fingerprint,
        "template_rendering": template_fingerprint(template, "per_turn"),
        **asdict(lengths),
        "backend": settings.backend,
        "shuffle": settings.shuffle,
        "seed": settings.seed,
        "train_files": [file_digest(f)["sha256"] for f in settings.train_files],
        "eval_files": [file_digest(f)["sha256"] for f in settings.eval_files],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    out = Path(settings.out_dir)
    splits = {"train": settings.train_files, **({"eval": settings.eval_files} if settings.eval_files else {})}
    with locked(out):
        if _up_to_date(out, digest, splits):
            counts = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
            say(f"pair records up to date: {out} (key {digest[:12]})")
            return _result(out, counts, reused=True)
        if out.exists() and not (out / PAIR_KEY_FILE).is_file() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a glmtune records folder; refusing to replace it")
        with replacing(out) as tmp:
            tmp.mkdir(parents=True)
            counts = {}
            for split, files in splits.items():
                counts[split] = _write_split(tmp / split, files, template, lengths, settings)
            if settings.shuffle and counts["train"] > 1:
                order = np.random.default_rng(settings.seed).permutation(counts["train"])
                write_order(tmp / "train", order)
            (tmp / REPORT_FILE).write_text(json.dumps(counts) + "\n", encoding="utf-8")
            (tmp / PAIR_KEY_FILE).write_text(json.dumps({"key": digest, "settings": key}, indent=2) + "\n")
    say(
        f"wrote {counts['train']} train pairs"
        + (f" and {counts['eval']} eval pairs" if "eval" in counts else "")
    )
    return _result(out, counts, reused=False)


def _write_split(
    folder: Path, files: Sequence[Path], template: Template, lengths: LengthSettings, settings: BuildSettings
) -> int:
    writer = open_writer(folder, fields=PAIR_FIELDS, backend=settings.backend)
    try:
        for file in files:
            for pair in iter_pairs(file):
                writer.write(pair_record(*fit_pair(*pair_sample(pair, template), lengths)))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if writer.num_records == 0:
        raise DataError(", ".join(map(str, files)), "no preference pairs in these files")
    return writer.num_records


def _up_to_date(out: Path, digest: str, splits: dict[str, Any]) -> bool:
    try:
        previous = json.loads((out / PAIR_KEY_FILE).read_text(encoding="utf-8"))
        for split in splits:
            read_meta(out / split)
    except (OSError, ValueError):
        return False
    return previous.get("key") == digest and (out / REPORT_FILE).is_file()


def _result(out: Path, counts: dict[str, int], reused: bool) -> PairRecords:
    has_eval = "eval" in counts
    return PairRecords(
        out / "train", out / "eval" if has_eval else None, counts["train"], counts.get("eval", 0), reused
    )


@dataclass
class PairCollator:
    """A batch of B pair records -> one batch of 2B sequences (prompt + chosen answer for rows 0..B-1, prompt +
    rejected answer for rows B..2B-1), padded as `Collator` pads supervised samples."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        sequences = []
        for answer in (CHOSEN, REJECTED):
            for item in items:
                keep = (item["part"] == PROMPT) | (item["part"] == answer)
                sequences.append({"input_ids": item["input_ids"][keep], "labels": item["labels"][keep]})
        return Collator(self.pad_token_id)(sequences)
