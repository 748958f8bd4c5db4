"""Direct Preference Optimization (`stage: dpo`): the loss, and the module that trains with it.

A batch holds 2B sequences, the B prompts followed by their chosen answers and then the same prompts followed
by their rejected answers (`glmtune.data.preference.PairCollator`), so the policy scores both in one forward.
A sequence's log-probability is the sum of its answer tokens' log-probabilities. The reference model costs no
second copy where the method allows: a PEFT adapter (LoRA, AdaLoRA, IA3) is disabled (`disable_adapter`), a
P-Tuning v2 prefix is switched off; `full` and `freeze` change the weights themselves, so they keep a frozen
copy of the model as it was before training.

DPO (Rafailov et al. 2023), with the margin h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):
sigmoid loss -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (eps: label smoothing, conservative
DPO), IPO (Azar et al. 2023) (h - 1 / (2 beta))^2 on log-probabilities averaged over each answer's tokens.
The implicit rewards are beta (log pi(y) - log pi_ref(y)), on summed log-probabilities for every loss.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmtune.config import DpoArgs, TrainArgs
from glmtune.data.samples import IGNORE_INDEX
from glmtune.training.module import CausalLMModule


def sequence_log_probs(
    hidden_states: torch.Tensor, head: nn.Module, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(labels[:, t + 1] | position t) over labels != -100, number of those tokens), per row.

    hidden_states [b, s, h], labels [b, s]. Only the answer positions go through the output layer."""
    hidden = hidden_states[:, :-1]
    targets = labels[:, 1:].to(hidden.device)
    supervised = targets != IGNORE_INDEX
    rows = torch.arange(targets.shape[0], device=hidden.device).unsqueeze(1).expand_as(targets)[supervised]
    log_probs = torch.log_softmax(head(hidden[supervised]).float(), dim=-1)
    picked = log_probs.gather(-1, targets[supervised].unsqueeze(-1)).squeeze(-1)
    total = torch.zeros(targets.shape[0], device=hidden.device, dtype=torch.float32).index_add(
        0, rows, picked
    )
    return total, supervised.sum(dim=1)


@dataclass
class PreferenceTerms:
    """Per-pair loss and implicit rewards of one batch."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    args: DpoArgs,
    summed: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> PreferenceTerms:
    """The DPO (or IPO) loss of each pair from the sequences' log-probabilities (see the module docstring).

    `summed`: the same four log-probabilities summed over the answers' tokens, when the loss is given averaged
    ones (IPO): the implicit rewards are always beta times the summed log-ratio."""
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    margin = chosen - rejected
    if args.loss == "ipo":
        losses = (margin - 1 / (2 * args.beta)) ** 2
    else:
        eps = args.label_smoothing
        losses = -F.logsigmoid(args.beta * margin) * (1 - eps) - F.logsigmoid(-args.beta * margin) * eps
    if summed is not None:
        chosen, rejected = summed[0] - summed[2], summed[1] - summed[3]
    return PreferenceTerms(losses, args.beta * chosen.detach(), args.beta * rejected.detach())


@contextmanager
def prefix_disabled(model: nn.Module) -> Iterator[None]:
    """`model` without its P-Tuning v2 prefix (glmtune's ChatGLM models read `pre_seq_len` at each forward)."""
    owners = [m for m in model.modules() if hasattr(m, "prefix_encoder") and m.pre_seq_len is not None]
    if not owners:
        raise ValueError("the model has no P-Tuning v2 prefix to switch off")
    lengths = [m.pre_seq_len for m in owners]
    try:
        for m in owners:
            m.pre_seq_len = None
        yield
    finally:
        for m, length in zip(owners, lengths, strict=True):
            m.pre_seq_len = length


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference for methods that train the model's own weights: a copy that never changes."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


class DPOModule(CausalLMModule):
    """Trains `model` with the DPO loss against a reference: `reference_model` (a frozen copy) if given, else
    `model` with its adapter disabled (PEFT) or its prefix switched off (`method: ptv2`)."""

    stage = "dpo"

    def __init__(
        self,
        model: nn.Module,
        train_args: TrainArgs,
        total_steps: int,
        method: str = "lora",
        dpo: DpoArgs | None = None,
        reference_model: nn.Module | None = None,
    ):
        super().__init__(model, train_args, total_steps, method=method)
        self.dpo = dpo or DpoArgs()
        # Not a submodule: it is neither trained nor saved in checkpoints; on_fit_start moves it to the device.
        object.__setattr__(self, "reference_model", reference_model)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.reference_model is not None:
            dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
            # a *-true precision has cast the policy by now: the reference computes as it does
            self.reference_model.to(device=self.device, dtype=dtype)

    def _reference(self) -> tuple[nn.Module, Any]:
        """The reference model and the context it runs in."""
        if self.reference_model is not None:
            return self.reference_model, nullcontext()
        if self.method == "ptv2":
            return self.model, prefix_disabled(self.model)
        return self.model, self.model.disable_adapter()

    def _answer_log_probs(
        self, hidden_states: torch.Tensor, labels: torch.Tensor, model: nn.Module | None = None
    ) -> torch.Tensor:
        """Each answer's log-probability: the sum over its tokens."""
        head = (model or self.model).get_output_embeddings()
        return sequence_log_probs(hidden_states, head, labels)[0]

    def reference_log_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The answers' log-probabilities under the reference model."""
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        model, context = self._reference()
        with torch.no_grad(), context:
            outputs = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
            return self._answer_log_probs(outputs.hidden_states[-1], batch["labels"], model)

    def loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        policy = self._answer_log_probs(outputs.hidden_states[-1], batch["labels"])
        reference = self.reference_log_probs(batch)
        pairs = policy.shape[0] // 2
        both = (policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:])
        if self.dpo.loss == "ipo":
            # IPO compares log-probabilities averaged over each answer's tokens; the rewards stay beta times the
            # summed log-ratio, as for DPO (and as TRL reports them).
            count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1).to(policy.device)
            mean = (policy / count, reference / count)
            averaged = (mean[0][:pairs], mean[0][pairs:], mean[1][:pairs], mean[1][pairs:])
            terms = dpo_loss(*averaged, self.dpo, summed=both)
        else:
            terms = dpo_loss(*both, self.dpo)
        self._log_terms(terms, policy.detach(), pairs)
        return terms.losses.mean()

    def _log_terms(self, terms: PreferenceTerms, policy: torch.Tensor, pairs: int) -> None:
        if self._trainer is None:  # called outside a Trainer (a test of the loss)
            return
        prefix = "train" if self.training else ("test" if self.trainer.testing else "val")
        values = {
            "reward_accuracy": (terms.chosen_rewards > terms.rejected_rewards).float().mean(),
            "reward_margin": (terms.chosen_rewards - terms.rejected_rewards).mean(),
            "rewards_chosen": terms.chosen_rewards.mean(),
            "rewards_rejected": terms.rejected_rewards.mean(),
            "logps_chosen": policy[:pairs].mean(),
            "logps_rejected": policy[pairs:].mean(),
        }
        for name, value in values.items():
            self.log(f"{prefix}_{name}", value, sync_dist=prefix != "train", batch_size=pairs)
