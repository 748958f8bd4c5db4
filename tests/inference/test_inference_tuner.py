"""glmtune.Tuner: the Python API drives the same config, training and inference code as the scripts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import glmtune
from glmtune.config import ConfigError
from glmtune.inference.artifacts import load_lora
from glmtune.inference.predict import predict
from glmtune.training.module import CausalLMModule
from tests.inference.conftest import REPO, task_config
from tests.training.training_helpers import train_script, write_config

TRAIN = REPO / "data" / "samples" / "prompt_completion.jsonl"
EVAL = REPO / "data" / "samples" / "input_target.jsonl"


def test_overrides_are_validated_like_the_command_line(tiny_model):
    tuner = glmtune.Tuner(tiny_model, method="ia3", lora={"r": 4}, generation={"max_new_tokens": 7})
    cfg = tuner.cfg
    assert (cfg.method, cfg.lora.r, cfg.generation.max_new_tokens) == ("ia3", 4, 7)
    assert cfg.model.path == str(tiny_model) and cfg.model.tiny is None
    assert cfg.lora.alpha == task_config().lora.alpha  # untouched keys keep config/default.yaml's values
    with pytest.raises(ConfigError, match="did you mean 'train.max_epochs'"):
        glmtune.Tuner(tiny_model, train={"max_epoch": 2})
    with pytest.raises(ConfigError, match="learning_rate"):
        glmtune.Tuner(tiny_model).tune(learning_rate="fast")
    with pytest.raises(ConfigError, match="method"):
        glmtune.Tuner(tiny_model, method="qlora")


def test_load_data_and_config_file(tiny_model, tmp_path):
    config = tmp_path / "task.yaml"
    config.write_text(
        f"model:\n  path: {tiny_model}\n  tiny: null\nmethod: freeze\ntrain:\n  max_epochs: 5\n"
    )
    tuner = glmtune.Tuner(config=config).load_data(TRAIN, [EVAL], max_seq_length=64)
    cfg = tuner.cfg
    assert (cfg.method, cfg.train.max_epochs, cfg.data.max_seq_length) == ("freeze", 5, 64)
    assert cfg.data.train_files == [str(TRAIN)] and cfg.data.eval_files == [str(EVAL)]
    assert glmtune.Tuner(tiny_model).load_data([TRAIN, EVAL]).cfg.data.eval_files == []


def test_chat_without_tuning_uses_the_base_model(tiny_model, base_engine):
    tuner = glmtune.Tuner(tiny_model, generation={"max_new_tokens": 10})
    response, history = tuner.chat("你好", [("在吗？", "在。")], max_new_tokens=5)
    assert response == base_engine.chat("你好", [("在吗？", "在。")], max_new_tokens=5)[0]
    assert history == [("在吗？", "在。"), ("你好", response)]
    with pytest.raises(ValueError, match="nothing tuned or loaded"):
        tuner.merge(REPO / "output" / "never-written")


@pytest.mark.slow
def test_tune_chat_eval_load_pretrained_and_merge(tiny_model, tmp_path):
    tuner = glmtune.Tuner(
        tiny_model,
        data={"output_dir": str(tmp_path / "records")},
        train={"output_dir": str(tmp_path / "run"), "batch_size": 4, "log_every_n_steps": 1},
        generation={"max_new_tokens": 16},
    )
    metrics = tuner.load_data(TRAIN, EVAL).tune(max_epochs=2)
    assert tuner.artifact == tmp_path / "run" / "final"
    assert (tuner.artifact / "adapter_model.safetensors").is_file()
    assert torch.isfinite(torch.tensor([metrics["train_loss"], metrics["val_loss"]])).all()
    assert json.loads((tuner.artifact / "metrics.json").read_text()) == pytest.approx(metrics)

    # Chat and eval go through the saved adapter, exactly as infer_lora_finetuning.py would.
    engine = load_lora(task_config("--generation.max_new_tokens", "16"), tuner.artifact)
    response, history = tuner.chat("山间茶舍几点开门？")
    assert response == engine.chat("山间茶舍几点开门？")[0] and history == [("山间茶舍几点开门？", response)]
    scores = tuner.eval()  # data.eval_files
    assert scores == predict(engine, EVAL, show=False)
    assert {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match"} <= set(scores)

    # A new Tuner picks the result up from disk.
    again = glmtune.Tuner(tiny_model, generation={"max_new_tokens": 16}).load_pretrained(tuner.artifact)
    assert again.chat("山间茶舍几点开门？")[0] == response

    merged = again.merge(tmp_path / "merged")
    assert again.chat("山间茶舍几点开门？")[0] == response
    assert glmtune.Tuner(merged, generation={"max_new_tokens": 16}).chat("山间茶舍几点开门？")[0] == response


class CountedLoss(CausalLMModule):
    calls = 0

    def loss(self, batch, outputs):
        type(self).calls += 1
        return super().loss(batch, outputs)


@pytest.mark.slow
def test_tune_trains_what_train_py_trains(tiny_model, tmp_path):
    """The same config through Tuner and through train.py (models.ChatModel): the same adapter, bit for bit;
    a module class given to Tuner is the one that trains."""
    tuner = glmtune.Tuner(
        tiny_model,
        data={"output_dir": str(tmp_path / "records")},
        train={"output_dir": str(tmp_path / "tuner"), "batch_size": 4, "max_steps": 2},
        lora={"dropout": 0.1},
        module_cls=CountedLoss,
    )
    tuner.load_data(TRAIN).tune()
    assert CountedLoss.calls == 2
    cfg = tuner.cfg
    cfg.train.output_dir = str(tmp_path / "script")
    config = write_config(cfg, tmp_path / "task.yaml")
    assert train_script().main(["--config", str(config)]) == 0
    by_tuner = load_file(tmp_path / "tuner" / "final" / "adapter_model.safetensors")
    by_script = load_file(tmp_path / "script" / "final" / "adapter_model.safetensors")
    assert by_tuner.keys() == by_script.keys() and by_tuner
    for name, value in by_tuner.items():
        torch.testing.assert_close(by_script[name], value, atol=0, rtol=0)
