"""One training path: train.py, Tuner and the benchmarks call the model the same way (CausalLMModule.model_step)
and differ only where `models.py` overrides `loss`."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from glmtune.config import ConfigError, TrainArgs
from glmtune.data.dataset import RecordDataset
from glmtune.models.loading import load_model
from glmtune.training import trainer as trainer_module
from glmtune.training.module import CausalLMModule, adalora_orthogonality_penalty
from glmtune.training.trainer import train
from models import ChatModel
from tests.training.conftest import make_cfg
from tests.training.training_helpers import train_script, write_config


def test_train_py_calls_the_model_with_every_input_key_and_no_cache(
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
    assert "seq_ids" in batch_keys and "labels" in batch_keys
    assert len(calls) >= 2
    for call in calls:
        assert call.pop("args") == ()
        assert call.pop("use_cache") is False
        # The model returns hidden states and the last position's logits; the labels are the loss's.
        assert call.pop("output_hidden_states") is True
        assert call.pop("logits_to_keep") == 1
        assert set(call) == batch_keys - {"labels"}


def full_logits(batch, outputs) -> bool:
    return outputs.logits.shape[1] == batch["input_ids"].shape[1]


class LogitsSeen(ChatModel):
    """ChatModel, noting whether each loss it computed had the logits of every position."""

    seen: list[bool] = []

    def loss(self, batch, outputs):
        type(self).seen.append(full_logits(batch, outputs))
        return super().loss(batch, outputs)


class CrossEntropyFromLogits(LogitsSeen):
    uses_logits = True
    label_smoothing = 0.0
    seen: list[bool] = []

    def loss(self, batch, outputs):
        type(self).seen.append(full_logits(batch, outputs))
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

    # The model computes no full logits unless the loss asks for them.
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


def module_and_model_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The LightningModule's default loss (hidden states, chunked) and the model's own from full logits."""
    module = CausalLMModule(model, TrainArgs(), total_steps=1)
    labels = batch["input_ids"].clone()
    labels[:, :3] = -100
    return module.model_step({**batch, "labels": labels}), model(**batch, labels=labels).loss


@pytest.mark.parametrize("folder", ["chatglm-6b-tiny", "chatglm2-6b-tiny"])
def test_default_loss_is_the_models_own_loss_chatglm(reference_dir, folder):
    model = load_model(reference_dir / folder, torch_dtype="float32")
    batch = torch.load(reference_dir / folder / "golden.pt", weights_only=True)["batch"]
    chunked, full = module_and_model_loss(model, batch)
    torch.testing.assert_close(chunked, full.float(), rtol=1e-6, atol=1e-6)


def test_default_loss_is_the_models_own_loss_transformers():
    """A transformers model: its last hidden state through its output embeddings."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 97, (2, 11))
    chunked, full = module_and_model_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)


def test_adalora_regulariser_is_peft_own():
    """The AdaLoRA regulariser the training step adds is the one PEFT adds to a loss its model computes."""
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    peft_config = AdaLoraConfig(
        init_r=4,
        target_r=2,
        total_step=10,
        tinit=1,
        tfinal=1,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",  # as glmtune wraps: PEFT's causal-LM wrapper calls AdaLoRA's forward
    )
    model = get_peft_model(LlamaForCausalLM(config), peft_config)
    with torch.no_grad():  # PEFT starts B at zero: make the penalty's A and B terms both count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.randint(0, 97, (2, 11))
    with_penalty = model(input_ids=ids, labels=ids).loss
    peft_config.orth_reg_weight = 0.0
    without = model(input_ids=ids, labels=ids).loss
    peft_config.orth_reg_weight = 0.5
    penalty = adalora_orthogonality_penalty(model)
    assert penalty > 0
    torch.testing.assert_close(without + penalty, with_penalty, rtol=0, atol=0)


def test_a_model_whose_logits_are_not_its_head_is_refused():
    """Logits scaled after the output layer (as soft-capping models do): the default loss, which reads the hidden
    states, would be wrong, so the first step says what to do instead."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config)

    def scale_logits(module, args, kwargs, outputs):
        outputs.logits = outputs.logits * 2.0
        return outputs

    model.register_forward_hook(scale_logits, with_kwargs=True)
    ids = torch.randint(0, 97, (2, 11))
    module = CausalLMModule(model, TrainArgs(), total_steps=1)
    with pytest.raises(ConfigError, match="uses_logits = True"):
        module.model_step({"input_ids": ids, "labels": ids})
