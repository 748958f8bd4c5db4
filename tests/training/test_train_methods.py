"""Every tuning method trains the tiny model, lowers its training loss, and its artifact reloads to the same
evaluation loss; quantized bases train LoRA and P-Tuning v2; impossible combinations fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmtune.config import ConfigError
from glmtune.data.dataset import RecordDataset, collate_fn
from glmtune.training.trainer import train
from tests.training.conftest import make_cfg
from tests.training.training_helpers import LossProbe, dataset_loss


def reload_artifact(cfg, artifact: Path) -> torch.nn.Module:
    from glmtune.inference.artifacts import load_finetuned, load_lora

    loader = load_lora if cfg.method in ("lora", "adalora", "ia3") else load_finetuned
    return loader(cfg, artifact).model


def eval_loss_of(model: torch.nn.Module, cfg) -> float:
    from glmtune.models.loading import load_tokenizer

    dataset = RecordDataset(Path(cfg.data.output_dir) / "eval")
    tokenizer = load_tokenizer(cfg.model.path)
    return dataset_loss(model, dataset, collate_fn(tokenizer.pad_token_id), cfg.train.eval_batch_size)


def run_and_check(cfg, min_drop: float = 0.1) -> tuple[LossProbe, object]:
    probe = LossProbe()
    result = train(cfg, callbacks=[probe], enable_progress_bar=False)
    assert probe.before is not None and probe.after is not None
    assert probe.after < probe.before - min_drop, (probe.before, probe.after)
    reloaded = reload_artifact(cfg, result.artifact_dir)
    assert eval_loss_of(reloaded, cfg) == pytest.approx(result.metrics["val_loss"], abs=1e-5)
    return probe, result


METHODS = {
    "full": {},
    "freeze_first": {"freeze": {"num_frozen_layers": 1}},
    "freeze_last": {"freeze": {"num_trainable_layers": 1, "train_head": True}},
    "ptv2": {},
    "ptv2_projection": {"ptv2": {"prefix_projection": True}},
    "lora": {},
    "lora_dora_rslora": {"lora": {"use_dora": True, "use_rslora": True, "modules_to_save": ["output_layer"]}},
    "adalora": {},
    "ia3": {},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(METHODS))
def test_method_trains_and_reloads(variant, tiny_chatglm2, tiny_data, tmp_path):
    method = variant.split("_")[0]
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", method, max_epochs=3)
    if method == "ptv2":
        cfg.train.learning_rate = 5e-2  # the published recipe's order of magnitude (2e-2) for prefixes
    for section, values in METHODS[variant].items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    if method == "ia3":
        cfg.train.learning_rate = 5e-2  # IA3 only rescales activations: it needs larger steps to move
    if method == "adalora":
        cfg.adalora.init_r, cfg.adalora.target_r = 8, 2
    _, result = run_and_check(cfg)
    artifact = result.artifact_dir
    if method in ("lora", "adalora", "ia3"):
        adapter_config = json.loads((artifact / "adapter_config.json").read_text())
        assert adapter_config["peft_type"] == {"lora": "LORA", "adalora": "ADALORA", "ia3": "IA3"}[method]
        assert not (artifact / "model.safetensors").exists()
    if method == "adalora":
        # The budget was allocated from the run's real step count and written for loading.
        assert adapter_config["total_step"] == result.total_steps == result.global_step
        assert adapter_config["rank_pattern"]
    if method == "ptv2":
        state = torch.load(artifact / "pytorch_model.bin", weights_only=True)
        assert state and all(k.startswith("transformer.prefix_encoder.") for k in state)
        assert all(v.dtype == torch.float32 for v in state.values())
    if method in ("full", "freeze"):
        assert (artifact / "config.json").is_file() and (artifact / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(("method", "lr"), [("lora", 2e-2), ("ptv2", 0.2)])
def test_chatglm6b_v1_trains_and_reloads(method, lr, tiny_chatglm, tiny_data, tmp_path):
    # Random weights with the real 130k vocabulary: the loss starts near ln(130528), and a prefix reaches the
    # logits only through attention, so P-Tuning v2 needs a large step to move it within 12 steps.
    cfg = make_cfg(tiny_chatglm, tiny_data, tmp_path / "run", method, max_epochs=2, learning_rate=lr)
    run_and_check(cfg, min_drop=0.05)


@pytest.mark.slow
@pytest.mark.parametrize(("bits", "method"), [(8, "lora"), (4, "lora"), (4, "ptv2")])
def test_quantized_base_trains(bits, method, tiny_chatglm2, tiny_data, tmp_path):
    lr = 5e-2 if method == "ptv2" else 1e-2
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", method, max_epochs=2, learning_rate=lr)
    cfg.model.quantization_bit = bits
    run_and_check(cfg)


@pytest.mark.parametrize(
    ("method", "bits", "lora", "message"),
    [
        ("full", 4, {}, "stores as integers"),
        ("freeze", 8, {}, "stores as integers"),
        ("adalora", 4, {}, "not available on ChatGLM int4"),
        ("ia3", 8, {}, "not available on ChatGLM int8"),
        ("lora", 4, {"use_dora": True}, "use_dora"),
    ],
)
def test_quantized_base_refuses_what_cannot_work(
    method, bits, lora, message, tiny_chatglm2, tiny_data, tmp_path
):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", method)
    cfg.model.quantization_bit = bits
    for key, value in lora.items():
        setattr(cfg.lora, key, value)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("mode", ["bnb8", "nf4"])
def test_bitsandbytes_needs_cuda(mode, tiny_chatglm2, tiny_data, tmp_path):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", "lora")
    cfg.model.quantization = mode
    with pytest.raises(ConfigError, match=f"model.quantization={mode} needs a CUDA GPU"):
        train(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bnb8", "nf4"])
def test_bitsandbytes_lora_on_gpu(mode, tiny_chatglm2, tiny_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(
        tiny_chatglm2, tiny_data, tmp_path / "run", "lora", accelerator="gpu", precision="bf16-mixed"
    )
    cfg.model.quantization = mode
    probe = LossProbe()
    result = train(cfg, callbacks=[probe], enable_progress_bar=False)
    assert probe.after < probe.before
    # Inference reads model.quantization too: the adapter reloads onto the same bitsandbytes weights and
    # reaches the run's validation loss (bf16 compute there, fp16 here: agreement to about a percent).
    reloaded = reload_artifact(cfg, result.artifact_dir)
    assert next(reloaded.parameters()).device.type == "cuda"
    assert eval_loss_of(reloaded, cfg) == pytest.approx(result.metrics["val_loss"], rel=0.02)


def test_freeze_counts_blocks(tiny_chatglm2, tiny_data, tmp_path):
    from glmtune.training.methods import apply_method
    from glmtune.training.trainer import load_for_method

    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", "freeze")
    cfg.freeze.num_trainable_layers = 1
    model = apply_method(load_for_method(cfg), cfg)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("transformer.encoder.layers.1.") for n in trained)
    cfg.freeze.num_trainable_layers = None
    cfg.freeze.num_frozen_layers = 2
    with pytest.raises(ConfigError, match="freeze.num_frozen_layers"):
        apply_method(load_for_method(cfg), cfg)
