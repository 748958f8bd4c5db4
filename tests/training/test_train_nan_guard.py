"""The non-finite loss guard: a bad micro-batch is skipped and counted; too many in a row stop the run."""

from __future__ import annotations

import pytest
import torch

from glmtune.training.module import CausalLMModule, NonFiniteLossError
from glmtune.training.trainer import train
from tests.training.conftest import make_cfg


class InfAt(CausalLMModule):
    """Replaces the loss by +Inf on the listed (epoch, batch_idx) micro-batches (all of them with None)."""

    bad: set[tuple[int, int]] | None = set()

    def training_step(self, batch, batch_idx):
        self._batch_key = (self.current_epoch, batch_idx)
        return super().training_step(batch, batch_idx)

    def loss(self, batch, outputs):
        loss = super().loss(batch, outputs)
        if self.training and (self.bad is None or self._batch_key in self.bad):
            return loss * float("inf")
        return loss


def adam_steps(trainer) -> set[int]:
    return {int(s["step"]) for s in trainer.optimizers[0].state.values()}


@pytest.mark.slow
def test_inf_loss_is_skipped_and_counted(tiny_chatglm2, tiny_data, tmp_path):
    import lightning as L

    class Record(L.Callback):
        def on_train_end(self, trainer, module):
            self.adam_steps = adam_steps(trainer)

    record = Record()
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", "lora", max_steps=6)
    InfAt.bad = {(0, 2)}
    result = train(cfg, module_cls=InfAt, callbacks=[record], enable_progress_bar=False)
    assert result.skipped_steps == 1
    assert result.global_step == 6
    # The skipped step updated nothing: Adam counted one step fewer than the trainer.
    assert record.adam_steps == {5}
    assert torch.isfinite(torch.tensor(result.metrics["train_loss"]))


def test_persistent_inf_loss_stops_with_a_clear_message(tiny_chatglm2, tiny_data, tmp_path):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", "lora", max_steps=20, max_bad_steps=3)
    InfAt.bad = None
    with pytest.raises(NonFiniteLossError, match=r"inf on 3 micro-batches in a row \(train.max_bad_steps=3"):
        train(cfg, module_cls=InfAt, enable_progress_bar=False)
