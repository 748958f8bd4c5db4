"""No dead config keys: every key of the schema is read by the code that runs with it.

Each section's dataclass records which of its fields are read, leaving out the reads that only construct,
validate, copy or print a config (they happen to every key, dead or alive). A training run, the methods it
does not use, the tiny model's build and an inference load then run with settings under which each key
matters; a key nothing read is dead, and fails the test with its name.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from glmtune.config import SECTIONS, TaskConfig, TinyModelArgs

from .conftest import TINY, make_cfg

# Frames whose reads do not count: dataclass machinery and validation, asdict (hparams files), repr, replace.
# Keys read only when something goes wrong, and the test that makes it go wrong.
READ_ON_FAILURE = {"train.max_bad_steps": "test_train_nan_guard.py"}
NOT_A_USE = {
    "__init__",
    "__post_init__",
    "_asdict_inner",
    "asdict",
    "to_dict",
    "__repr__",
    "__eq__",
    "replace",
}


def schema_keys() -> set[str]:
    keys = {"method"}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            keys.add(f"{section}.{f.name}")
    keys |= {f"model.tiny.{f.name}" for f in dataclasses.fields(TinyModelArgs)}
    keys.discard("model.tiny")  # the section itself; its keys are listed one by one
    return keys


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    found: set[str] = set()
    owners = {**SECTIONS, "model.tiny": TinyModelArgs, "": TaskConfig}
    for section, cls in owners.items():
        names = {f.name for f in dataclasses.fields(cls)}
        if cls is TaskConfig:
            names = {"method"}

        def getattribute(self, name, _names=names, _section=section):
            if sys._getframe(1).f_code.co_name not in NOT_A_USE:
                # `section.__dict__` hands every field over at once (e.g. as keyword arguments)
                for key in _names if name == "__dict__" else {name} & _names:
                    found.add(f"{_section}.{key}" if _section else key)
            return object.__getattribute__(self, name)

        monkeypatch.setattr(cls, "__getattribute__", getattribute)
    return found


@pytest.mark.slow
def test_every_config_key_is_read(reads, tiny_data, tmp_path, monkeypatch) -> None:
    from glmtune.demo.tiny import build_tiny_chatglm2
    from glmtune.inference.artifacts import load_base
    from glmtune.models.loading import load_model
    from glmtune.training.methods import apply_method
    from glmtune.training.preference import dpo_loss
    from glmtune.training.trainer import load_for_method, train

    model_dir = build_tiny_chatglm2(tmp_path / "tiny", dataclasses.replace(TINY))
    # torch.compile on a CPU costs minutes; what matters here is that the run hands it the configured mode.
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    cfg = make_cfg(
        model_dir, tiny_data, tmp_path / "run", max_epochs=1, scheduler="cosine_restarts",
        gradient_checkpointing=True, checkpoint_layers=1, compile=True, eval_generate=1,
        eval_every_n_steps=3, save_every_n_steps=3,
    )  # fmt: skip
    cfg.data.strategy = "slide"
    train(cfg)

    for method in ("freeze", "adalora", "ia3"):
        cfg.method = method
        apply_method(load_model(model_dir), cfg, 10)
    cfg.method = "ptv2"
    apply_method(load_for_method(cfg), cfg, 10)
    cfg.method = "lora"
    load_base(cfg)
    # stage: dpo's loss settings (its run is tests/training/test_dpo.py's).
    dpo_loss(*[torch.zeros(1)] * 4, cfg.dpo)

    for key, test_file in READ_ON_FAILURE.items():
        assert key.split(".")[-1] in (Path(__file__).parent / test_file).read_text(), (key, test_file)
    dead = sorted(schema_keys() - reads - set(READ_ON_FAILURE))
    assert not dead, f"config keys that no code read: {dead}"
