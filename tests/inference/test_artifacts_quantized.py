"""`model.quantization` (bitsandbytes) at inference: the block linears become bitsandbytes layers on CUDA, the
model still computes about what the float one does, and an adapter loads on top. Without CUDA the key is
refused (tests/cli/test_inference_errors.py), never ignored."""

from __future__ import annotations

import json

import pytest
import torch

from glmtune.inference.artifacts import load_base, load_lora
from tests.inference.conftest import run_script, task_config

QUERIES = ["山间茶舍几点开门？", "绿茶用多少度的水冲泡？"]


def logits(engine) -> torch.Tensor:
    batch = engine._batch([engine.prompt_ids(q) for q in QUERIES])
    with torch.no_grad():
        return engine.model(**batch).logits.float().cpu()


def bnb_layer_type(mode: str) -> type:
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.nn.Linear4bit if mode == "nf4" else bnb.nn.Linear8bitLt


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nf4", "bnb8"])
def test_base_model_is_quantized_like_training(mode, tiny_model):
    layer_type = bnb_layer_type(mode)
    plain = load_base(task_config("--model.path", str(tiny_model)), "cuda")
    engine = load_base(task_config("--model.path", str(tiny_model), "--model.quantization", mode))
    assert engine.device.type == "cuda"
    quantized = [n for n, m in engine.model.named_modules() if isinstance(m, layer_type)]
    # The four block linears of each of the tiny model's layers; the output layer stays in float.
    assert len(quantized) == 4 * engine.model.config.num_layers, quantized
    assert all(".layers." in n for n in quantized)
    expected, got = logits(plain), logits(engine)
    assert not torch.equal(got, expected)  # the weights really are the quantized ones
    similarity = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert similarity > 0.9, float(similarity)


@pytest.mark.gpu
def test_adapter_on_a_quantized_base_through_the_script(lora_adapter, tmp_path):
    layer_type = bnb_layer_type("nf4")
    engine = load_lora(task_config("--model.quantization", "nf4"), lora_adapter)
    adapted = [n for n, m in engine.model.named_modules() if "lora_A" in n]
    assert adapted and any(isinstance(m, layer_type) for m in engine.model.modules())
    data = tmp_path / "items.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": q, "completion": "?"}, ensure_ascii=False) + "\n" for q in QUERIES)
    )
    out = tmp_path / "predictions.jsonl"
    flags = ["--checkpoint", str(lora_adapter), "--model.quantization", "nf4", "--predict", str(data)]
    proc = run_script(
        "infer_lora_finetuning.py", *flags, "--out", str(out), "--generation.max_new_tokens", "8"
    )
    assert proc.stdout.strip().splitlines()[-1] == "exact match: 0/2"
    assert len(out.read_text().splitlines()) == 2
