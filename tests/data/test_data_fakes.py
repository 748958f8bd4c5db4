"""A char-level fake chat template for the data tests (the real ones live in glmtune/tokenizers/prompts.py).

Ids: 1, 2 = a two-token prefix like ChatGLM2's `[gMASK] sop` (protected by truncation), 3 = end of answer,
every other id is a character's code point. Prompt text: "Q:{q}\\nA:{a}\\n" per history turn, then
"Q:{query}\\nA:". Imported by the other test modules of this folder (pytest puts the folder on sys.path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from glmtune.data.build import build_records
from glmtune.data.report import BuildReport
from glmtune.data.settings import BuildSettings

IGNORE = -100
# build_records' own arguments; every other option of `build_with` is a BuildSettings field.
RUN_OPTIONS = ("template", "template_factory", "tokenizer_fingerprint", "force", "progress", "verbose")
PREFIX = [1, 2]
EOS = 3


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode(ids: Sequence[int]) -> str:
    special = {1: "<g>", 2: "<s>", 3: "</s>"}
    return "".join(special.get(int(i), chr(int(i)) if i > 3 else "?") for i in ids)


class CharTemplate:
    name = "char-test"
    protected_head = 2

    def prompt(self, query: str, history: Sequence[tuple[str, str]] | None = None) -> str:
        return "".join(f"Q:{q}\nA:{a}\n" for q, a in history or []) + f"Q:{query}\nA:"

    def build_train_sample(
        self, query: str, response: str, history: Sequence[tuple[str, str]] | None = None
    ) -> tuple[list[int], list[int]]:
        prompt = PREFIX + encode(self.prompt(query, history))
        answer = encode(response) + [EOS]
        return prompt + answer, [IGNORE] * len(prompt) + answer

    def build_dialogue_sample(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
        ids, labels = list(PREFIX), [IGNORE] * len(PREFIX)
        for i, (q, a) in enumerate(turns):
            prompt = encode(("\n" if i else "") + f"Q:{q}\nA:")
            answer = encode(a) + [EOS]
            ids += prompt + answer
            labels += [IGNORE] * len(prompt) + answer
        return ids, labels


class SystemCharTemplate(CharTemplate):
    """Takes the system prompt as a keyword argument."""

    name = "char-test-system"

    def build_train_sample(self, query, response, history=None, system=None):
        ids, labels = super().build_train_sample(query, response, history)
        head = PREFIX + encode(f"S:{system}\n") if system else PREFIX
        return head + ids[2:], [IGNORE] * len(head) + labels[2:]


class TurnOnlyTemplate:
    """No build_dialogue_sample: multi_turn="dialogue" must refuse it."""

    name = "char-turn-only"

    def build_train_sample(self, query, response, history=None):
        return CharTemplate().build_train_sample(query, response, history)


def build_with(files: Any, **options: Any) -> BuildReport:
    """build_records with the settings and the run's options given together, as the tests write them."""
    run = {name: options.pop(name) for name in RUN_OPTIONS if name in options}
    return build_records(BuildSettings(files, **options), **run)


def make_char_template() -> CharTemplate:
    """A picklable template factory (module-level function)."""
    return CharTemplate()


def test_char_template_labels():
    ids, labels = CharTemplate().build_train_sample("hi", "yo", history=[("a", "b")])
    assert decode(ids) == "<g><s>Q:a\nA:b\nQ:hi\nA:yo</s>"
    assert [i for i, label in zip(ids, labels) if label != IGNORE] == encode("yo") + [EOS]


def test_char_dialogue_sample_supervises_every_answer():
    ids, labels = CharTemplate().build_dialogue_sample([("a", "bb"), ("c", "dd")])
    assert decode(ids) == "<g><s>Q:a\nA:bb</s>\nQ:c\nA:dd</s>"
    assert decode(i for i, label in zip(ids, labels) if label != IGNORE) == "bb</s>dd</s>"
