"""Data parallelism on CPU (DDP with gloo: 2 local processes, and 2 "machines" on localhost), and the
DeepSpeed / FSDP setups validated as far as the libraries allow without a GPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmtune.config import ConfigError
from glmtune.training.distributed import (
    DEEPSPEED_DIR,
    DEEPSPEED_PRESETS,
    AdapterHalfPrecision,
    load_deepspeed_config,
    make_strategy,
    precision_args,
)
from tests.conftest import REPO_ROOT
from tests.training.conftest import make_cfg
from tests.training.test_train_methods import eval_loss_of
from tests.training.training_helpers import LossProbe

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(
    tmp_path: Path, model: Path, data: dict, method: str, extra: dict | None = None, **train
) -> Path:
    """The worker's spec: `train` keys go to the config's train section, `extra` into the spec itself."""
    spec = {
        "model": str(model),
        "data": {k: str(v) for k, v in data.items()},
        "output_dir": str(tmp_path / "run"),
        "method": method,
        "records": str(tmp_path / "records"),
        "train": {"max_steps": 3, "batch_size": 2, **train},
        **(extra or {}),
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **extra)
    return env


def run_ddp_worker(spec: Path) -> None:
    """One `ddp_worker.py` launch on this machine; Lightning starts the other local ranks from it."""
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    done = subprocess.run(
        [sys.executable, str(WORKER), str(spec)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_weights_on_ranks(run_dir: Path, world: int, skipped: int = 0) -> None:
    states = [torch.load(run_dir / f"weights-rank{r}.pt", weights_only=True) for r in range(world)]
    assert [s["skipped"] for s in states] == [skipped] * world
    assert all(s["world_size"] == world for s in states)
    assert len({s["step"] for s in states}) == 1 and states[0]["step"] == 3
    reference = states[0]["weights"]
    assert reference
    for state in states[1:]:
        assert state["weights"].keys() == reference.keys()
        for name, value in reference.items():
            assert torch.equal(state["weights"][name], value), name
    # Equal weights prove nothing if no step changed them (e.g. every step skipped, or no gradient synced).
    unmoved = [name for name, value in reference.items() if torch.equal(value, states[0]["initial"][name])]
    assert not unmoved, f"trained weights left at their initial values: {unmoved}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "ptv2"])
def test_ddp_two_processes_end_with_identical_weights(method, tiny_chatglm2, tiny_data, tmp_path):
    # With LoRA, an Inf loss on rank 1 only: both ranks must skip that micro-batch together (no hang, same
    # weights).
    extra = {"inf_at": [1, 1]} if method == "lora" else None
    spec = write_spec(tmp_path, tiny_chatglm2, tiny_data, method, extra, strategy="ddp", devices=2)
    run_ddp_worker(spec)
    assert_same_weights_on_ranks(tmp_path / "run", 2, skipped=1 if method == "lora" else 0)
    assert (
        tmp_path
        / "run"
        / "final"
        / ("adapter_model.safetensors" if method == "lora" else "pytorch_model.bin")
    ).is_file()


@pytest.mark.slow
def test_ddp_dpo_with_a_frozen_reference_copy_ends_with_identical_weights(tiny_chatglm2, tmp_path):
    """stage: dpo, method freeze under DDP: the reference copy sits beside the wrapped module on each rank."""
    pairs = {
        "train": REPO_ROOT / "data" / "samples" / "preference_train.jsonl",
        "dev": REPO_ROOT / "data" / "samples" / "preference_dev.jsonl",
    }
    spec = write_spec(tmp_path, tiny_chatglm2, pairs, "freeze", {"stage": "dpo"}, strategy="ddp", devices=2)
    run_ddp_worker(spec)
    assert_same_weights_on_ranks(tmp_path / "run", 2)
    metrics = json.loads((tmp_path / "run" / "final" / "metrics.json").read_text())
    assert "train_reward_accuracy" in metrics


@pytest.mark.slow
def test_two_machines_on_localhost_end_with_identical_weights(tiny_chatglm2, tiny_data, tmp_path):
    """The manual multi-node launch: the same command on every machine, NODE_RANK telling them apart."""
    spec = write_spec(tmp_path, tiny_chatglm2, tiny_data, "lora", strategy="ddp", devices=1, num_nodes=2)
    port = str(free_port())
    procs = []
    for node in (0, 1):
        # Each "machine" builds its own records, as machines without a shared disk would.
        node_spec = tmp_path / f"spec-{node}.json"
        content = json.loads(spec.read_text())
        content["records"] = str(tmp_path / f"records-node{node}")
        node_spec.write_text(json.dumps(content))
        env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(node_spec)],
                env=env,
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert_same_weights_on_ranks(tmp_path / "run", 2)


# ------------------------------------------------------------------ DeepSpeed and FSDP, validated on CPU


@pytest.mark.parametrize("name", sorted(DEEPSPEED_PRESETS))
def test_deepspeed_configs_parse_and_build_strategies(name, tiny_chatglm2, tiny_data, tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from lightning.pytorch.strategies import DeepSpeedStrategy

    config = load_deepspeed_config(name)
    stage = int(name.split("_")[2])
    assert config["zero_optimization"]["stage"] == stage
    offload = name.endswith("offload")
    assert ("offload_optimizer" in config["zero_optimization"]) == offload
    # What Lightning adds from the train section; DeepSpeed's own parser must accept the result.
    full = {
        **config,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
    }
    parsed = (
        DeepSpeedConfig(full, world_size=1)
        if "world_size" in DeepSpeedConfig.__init__.__code__.co_varnames
        else DeepSpeedConfig(full)
    )
    assert parsed.zero_optimization_stage == stage
    assert parsed.zero_config.offload_optimizer is not None or not offload

    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", "lora", strategy=name)
    strategy = make_strategy(cfg, torch.nn.Module())
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.zero_stage_3 == (stage == 3)
    assert strategy.exclude_frozen_parameters  # adapter checkpoints leave the frozen base out


def test_deepspeed_json_path_and_bad_files(tmp_path, tiny_chatglm2, tiny_data):
    assert load_deepspeed_config(str(DEEPSPEED_DIR / "zero3.json"))["zero_optimization"]["stage"] == 3
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}')
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        load_deepspeed_config(str(bad))
    bad.write_text('{"zero_optimization": {"stage": 2},')
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_deepspeed_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_deepspeed_config(str(tmp_path / "missing.json"))
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", "adalora", strategy="deepspeed_stage_2")
    with pytest.raises(ConfigError, match="adalora under DeepSpeed"):
        make_strategy(cfg, torch.nn.Module())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_deepspeed_without_gpu_fails_before_loading(tiny_chatglm2, tiny_data, tmp_path):
    from glmtune.training.trainer import train

    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", "lora", strategy="deepspeed_stage_3")
    with pytest.raises(ConfigError, match="DeepSpeed and FSDP on CUDA GPUs only"):
        train(cfg)


def test_fsdp_strategy_wraps_blocks(tiny_chatglm2, tiny_data, tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    from glmtune.models.chatglm2 import GLMBlock
    from glmtune.training.trainer import load_for_method

    cfg = make_cfg(
        tiny_chatglm2, tiny_data, tmp_path / "run", "lora", strategy="fsdp", gradient_checkpointing=True
    )
    strategy = make_strategy(cfg, load_for_method(cfg))
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    assert GLMBlock in getattr(policy, "_module_classes", {GLMBlock})
    assert strategy._state_dict_type == "full"


def test_unknown_strategy_is_refused(tiny_chatglm2, tiny_data, tmp_path):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", "lora", strategy="zero9")
    with pytest.raises(ConfigError, match="train.strategy: unknown 'zero9'"):
        make_strategy(cfg, torch.nn.Module())


def test_true_half_precision_keeps_adapters_in_fp32(tiny_chatglm2, tiny_data, tmp_path):
    from glmtune.training.methods import apply_method
    from glmtune.training.trainer import load_for_method

    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", "ptv2", precision="bf16-true")
    plugin = precision_args(cfg)["plugins"][0]
    assert isinstance(plugin, AdapterHalfPrecision)
    model = plugin.convert_module(apply_method(load_for_method(cfg), cfg))
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if "prefix_encoder." in name else torch.bfloat16), name
    cfg.method = "full"
    assert precision_args(cfg) == {"precision": "bf16-true"}


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_deepspeed_lora_on_gpu(strategy, tiny_chatglm2, tiny_data, tmp_path):
    pytest.importorskip("deepspeed")
    from glmtune.inference.artifacts import load_lora
    from glmtune.training.trainer import train

    cfg = make_cfg(
        tiny_chatglm2,
        tiny_data,
        tmp_path / "run",
        "lora",
        strategy=strategy,
        accelerator="gpu",
        precision="bf16-mixed",
        max_steps=4,
    )
    probe = LossProbe()
    result = train(cfg, callbacks=[probe], enable_progress_bar=False)
    assert probe.after < probe.before, (probe.before, probe.after)
    # The sharded run's adapter loads without a conversion step and computes what the run validated with
    # (bf16 autocast there, fp32 here: agreement to about a percent).
    reloaded = load_lora(cfg, result.artifact_dir).model
    assert eval_loss_of(reloaded, cfg) == pytest.approx(result.metrics["val_loss"], rel=0.02)
