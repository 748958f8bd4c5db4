"""Every shipped task config parses against the schema and passes the checks made before any loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmtune.config import build_parser, parse_args
from glmtune.training.distributed import is_deepspeed, load_deepspeed_config
from glmtune.training.methods import check_method
from tests.conftest import REPO_ROOT

CONFIGS = sorted(p for p in (REPO_ROOT / "config").glob("*.yaml") if p.name != "default.yaml")
TRAINING_CONFIGS = [
    "lora",
    "ptv2",
    "ptv2_int4",
    "full",
    "freeze",
    "adalora",
    "ia3",
    "qlora_int4",
    "qlora_nf4",
    "deepspeed_zero2_lora",
    "multinode_3x4",
]


@pytest.fixture(scope="module")
def parser():
    return build_parser("test")


def test_every_method_has_an_example():
    assert {p.stem for p in CONFIGS} >= set(TRAINING_CONFIGS)


@pytest.mark.parametrize(
    "path", [REPO_ROOT / "config" / f"{n}.yaml" for n in TRAINING_CONFIGS], ids=TRAINING_CONFIGS
)
def test_config_parses_and_is_consistent(path: Path, parser):
    cfg, _ = parse_args(parser, ["--config", str(path)])
    check_method(cfg)
    # A real checkpoint: the embedded tiny model's settings from default.yaml must not leak in.
    assert cfg.model.tiny is None
    if cfg.method in ("lora", "adalora", "ia3"):
        assert cfg.lora.modules_to_save is None
    if is_deepspeed(cfg.train.strategy):
        load_deepspeed_config(cfg.train.strategy)
    if path.stem == "multinode_3x4":
        assert (cfg.train.num_nodes, cfg.train.devices) == (3, 4)
