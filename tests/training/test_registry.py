"""The one table of tuning methods: it covers every method the config accepts, and its readers agree with it."""

from __future__ import annotations

import typing

import pytest

from glmtune.config import ConfigError, Method
from glmtune.training.registry import METHODS, PEFT_METHODS, tuning_method


def test_every_method_the_config_accepts_has_one_entry():
    assert set(METHODS) == set(typing.get_args(Method))


def test_loaders_and_scripts_follow_what_the_artifact_holds():
    assert PEFT_METHODS == ("lora", "adalora", "ia3")
    assert {name for name, m in METHODS.items() if m.loader == "lora"} == set(PEFT_METHODS)
    assert METHODS["ptv2"].script == METHODS["full"].script == "infer_finetuning.py"
    assert METHODS["ia3"].script == "infer_lora_finetuning.py"
    assert [name for name, m in METHODS.items() if m.trains_base_weights] == ["full", "freeze"]


def test_an_unknown_method_names_where_it_was_read():
    with pytest.raises(
        ConfigError, match=r"run/hyperparameters.yaml: method 'magic' is not a glmtune tuning"
    ):
        tuning_method("magic", "run/hyperparameters.yaml")
