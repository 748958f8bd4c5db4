"""One process of a data-parallel test run: `python ddp_worker.py SPEC.json`.

Lightning's DDP launcher starts the other local ranks by running this same command again, and the
multi-node test starts one per "machine" with NODE_RANK set; each process trains, then writes the weights
it ended with to `<output_dir>/weights-rank<global rank>.pt` for the test to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from glmtune.training.module import CausalLMModule  # noqa: E402
from glmtune.training.trainer import train  # noqa: E402
from tests.training.conftest import make_cfg  # noqa: E402
from tests.training.training_helpers import LossProbe  # noqa: E402


class FinalWeights(LossProbe):
    """Saves the trained weights as they were before the first step and after the last."""

    @staticmethod
    def trained(module) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer, module) -> None:
        super().on_train_start(trainer, module)
        self.initial = self.trained(module)

    def on_train_end(self, trainer, module) -> None:
        out = Path(trainer.default_root_dir) / f"weights-rank{trainer.global_rank}.pt"
        state = {
            "initial": self.initial,
            "weights": self.trained(module),
            "world_size": trainer.world_size,
            "step": trainer.global_step,
            "skipped": module.bad_steps_total,
        }
        torch.save(state, out)


class InfOnOneRank(CausalLMModule):
    """+Inf loss on one rank at one micro-batch: the skip must still happen on every rank together."""

    inf_at: tuple[int, int] = (-1, -1)  # (global rank, batch_idx) in epoch 0

    def training_step(self, batch, batch_idx):
        self._here = (self.global_rank, batch_idx) == tuple(self.inf_at) and self.current_epoch == 0
        return super().training_step(batch, batch_idx)

    def loss(self, batch, outputs):
        loss = super().loss(batch, outputs)
        return loss * float("inf") if self.training and self._here else loss


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    data = {k: Path(v) for k, v in spec["data"].items()}
    cfg = make_cfg(Path(spec["model"]), data, Path(spec["output_dir"]), spec["method"], **spec["train"])
    if "records" in spec:
        cfg.data.output_dir = spec["records"]
    cfg.stage = spec.get("stage", "sft")
    InfOnOneRank.inf_at = tuple(spec.get("inf_at", (-1, -1)))
    train(cfg, module_cls=InfOnOneRank, callbacks=[FinalWeights()], enable_progress_bar=False)


if __name__ == "__main__":
    main(sys.argv[1])
