"""One training path: train.py, Tuner and the benchmarks call the model the same way (CausalLMModule.model_step)
and differ only where `models.py` overrides `loss`."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from glmtune.data.dataset import RecordDataset
from glmtune.training import trainer as trainer_module
from glmtune.training.module import CausalLMModule
from glmtune.training.trainer import train
from models import ChatModel
from tests.training.conftest import make_cfg
from tests.training.training_helpers import train_script, write_config


def test_train_py_calls_the_model_with_every_batch_key_and_no_cache(
    tiny_chatglm2, tiny_data, tmp_path, monkeypatch
):
    # Packed records: the batch carries seq_ids and position_ids besides input_ids and labels.
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", max_steps=2)
    cfg.data.packing = True
    calls: list[dict] = []

    def record_calls(*args, **kwargs):
        model = apply_method(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, a, kw: calls.append({"args": a, **kw}), with_kwargs=True)
        return model

    apply_method = trainer_module.apply_method
    monkeypatch.setattr(trainer_module, "apply_method", record_calls)
    config = write_config(cfg, tmp_path / "task.yaml")
    assert train_script().main(["--config", str(config)]) == 0

    records = RecordDataset(f"{cfg.data.output_dir}/train")
    batch_keys = {*records[0], "attention_mask"}
    assert "seq_ids" in batch_keys
    assert len(calls) >= 2
    for call in calls:
        assert call.pop("args") == ()
        assert call.pop("use_cache") is False
        assert set(call) == batch_keys


class LogitsSeen(ChatModel):
    """ChatModel, noting whether each loss it computed had the full logits."""

    seen: list[bool] = []

    def loss(self, batch, outputs):
        type(self).seen.append(outputs.logits is not None)
        return super().loss(batch, outputs)


class CrossEntropyFromLogits(LogitsSeen):
    uses_logits = True
    label_smoothing = 0.0
    seen: list[bool] = []

    def loss(self, batch, outputs):
        type(self).seen.append(outputs.logits is not None)
        logits = outputs.logits[:, :-1].flatten(0, 1).float()
        labels = batch["labels"][:, 1:].flatten()
        return F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=self.label_smoothing)


class Smoothed(CrossEntropyFromLogits):
    label_smoothing = 0.5
    seen: list[bool] = []


class TrainedWeights(L.Callback):
    def on_train_end(self, trainer, module) -> None:
        self.weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def trained(cfg, module_cls) -> dict[str, torch.Tensor]:
    weights = TrainedWeights()
    train(cfg, module_cls=module_cls, callbacks=[weights], enable_progress_bar=False)
    return weights.weights


@pytest.mark.slow
def test_the_loss_is_what_a_subclass_overrides(tiny_chatglm2, tiny_data, tmp_path):
    def cfg(name: str):
        run = make_cfg(tiny_chatglm2, tiny_data, tmp_path / name, max_steps=3)
        run.data.eval_files = []
        return run

    base = trained(cfg("base"), CausalLMModule)  # what Tuner and the benchmarks train with by default
    script = trained(cfg("script"), LogitsSeen)  # train.py's ChatModel, unedited
    from_logits = trained(cfg("logits"), CrossEntropyFromLogits)
    smoothed = trained(cfg("smoothed"), Smoothed)

    # The trainer turns on the chunked loss (no full logits) unless the loss asks for the logits.
    assert LogitsSeen.seen and not any(LogitsSeen.seen)
    assert CrossEntropyFromLogits.seen and all(CrossEntropyFromLogits.seen)
    for name, value in base.items():
        torch.testing.assert_close(script[name], value, atol=0, rtol=0)
        torch.testing.assert_close(from_logits[name], value, atol=1e-5, rtol=0)
    assert any(not torch.allclose(smoothed[name], value, atol=1e-4) for name, value in base.items())


def test_model_step_cannot_be_overridden():
    with pytest.raises(TypeError, match="override loss"):

        class OwnCall(CausalLMModule):
            def model_step(self, batch):
                return self.model(**batch).loss
