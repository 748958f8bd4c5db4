"""Generation metrics in the eval loop: answer the first eval turns and score them like `--predict` does."""

from __future__ import annotations

from typing import Any

import lightning as L

from glmtune.config import GenerationArgs
from glmtune.inference.engine import ChatEngine
from glmtune.inference.metrics import text_metrics
from glmtune.training.compile import eager


class GenerationEval(L.Callback):
    """After each validation pass, greedy-answer `items` (query, history, reference) with the model being
    trained and log `val_exact_match` and, when the eval extras are installed, `val_rouge-1/2/l`, `val_bleu-4`.

    Every rank computes the same greedy answers, so nothing has to be gathered; rank 0 logs them.
    """

    def __init__(self, items: list[dict], tokenizer: Any, template: Any, generation: GenerationArgs):
        self.items = items
        self.tokenizer = tokenizer
        self.template = template
        self.generation = generation
        self.predictions: list[str] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.items:
            return
        engine = ChatEngine(pl_module.model, self.tokenizer, self.template, self.generation)
        with eager():  # compiled blocks (train.compile) would recompile at every length of the growing cache
            completions = engine.batch_complete(
                [item["query"] for item in self.items],
                [item["history"] for item in self.items],
                [item.get("system") for item in self.items],
            )
        self.predictions = [c.text for c in completions]
        references = [item["reference"] for item in self.items]
        scores = {
            "exact_match": sum(p.strip() == r.strip() for p, r in zip(self.predictions, references))
            / len(references)
        }
        try:
            scores.update(text_metrics(self.predictions, references))
        except ImportError:  # the scorers are an extra (glmtune[eval]); exact match needs nothing
            pass
        pl_module.log_dict({f"val_{k}": float(v) for k, v in scores.items()}, rank_zero_only=True)
