"""glmtune's DPO loss and rewards against TRL's own code (`trl.DPOTrainer._compute_loss`), on the same
per-token log-probabilities.

TRL (a test dependency only) computes the loss inside `_compute_loss`, from the model's per-token log-probs of
the completions: the trainer below is built without `__init__` and given only what that method reads, and the
"model" hands back fixed log-probs, so TRL's loss and reward code runs unchanged on numbers glmtune gets too.
TRL 1.x's `sigmoid` loss no longer takes `label_smoothing`; its conservative-DPO form lives on in the `aot`
loss, which sorts the batch's margins first, so with one pair per call it is exactly conservative DPO.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from glmtune.config import DpoArgs
from glmtune.training.preference import dpo_loss

trl = pytest.importorskip("trl")

PAIRS, LENGTH = 3, 7
# Completion (answer) tokens of each sequence: the 3 chosen ones, then the 3 rejected ones; the rest is prompt
# or padding. Different lengths, so summed and averaged log-probabilities differ.
COMPLETION = [(3, 6), (2, 7), (4, 5), (3, 5), (2, 4), (4, 7)]


class _Accelerator:
    """One process: gathering is the identity."""

    device = torch.device("cpu")

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    gather_for_metrics = gather


def _batch(seed: int) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's inputs, the policy's per-token log-probs (0 off the completions) and the reference's summed ones."""
    generator = torch.Generator().manual_seed(seed)
    completion = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.long)
    for row, (start, end) in enumerate(COMPLETION):
        completion[row, start:end] = 1
    shifted = completion[:, 1:]
    per_token = -torch.rand(2 * PAIRS, LENGTH - 1, generator=generator) * 3 * shifted
    reference = per_token.sum(1) + torch.randn(2 * PAIRS, generator=generator)
    inputs = {
        "input_ids": torch.ones(2 * PAIRS, LENGTH, dtype=torch.long),
        "attention_mask": torch.ones(2 * PAIRS, LENGTH, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": reference[:PAIRS],
        "ref_rejected_logps": reference[PAIRS:],
    }
    return inputs, per_token, reference, shifted.sum(1)


def trl_terms(inputs: dict, per_token: torch.Tensor, loss_type: str, beta: float, eps: float = 0.0):
    """TRL's loss and its logged reward metrics for one batch."""
    from trl import DPOTrainer

    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model.training = True
    trainer = object.__new__(DPOTrainer)  # no model, data or accelerate set-up: only what _compute_loss reads
    trainer.__dict__.update(
        model=model, accelerator=_Accelerator(), beta=beta, label_smoothing=eps, loss_types=[loss_type],
        loss_weights=[1.0], ld_alpha=None, f_divergence_type="reverse_kl", precompute_ref_logps=True,
        use_weighting=False, aux_loss_enabled=False, _tp_size=1, _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )  # fmt: skip
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss, metrics


def glmtune_terms(per_token, reference, counts, args: DpoArgs):
    """dpo_loss as DPOModule calls it: IPO's loss on log-probs averaged over the answer's tokens, its rewards
    (and every other loss's) on summed ones."""
    policy = per_token.sum(1)
    summed = (policy[:PAIRS], policy[PAIRS:], reference[:PAIRS], reference[PAIRS:])
    if args.loss != "ipo":
        return dpo_loss(*summed, args)
    policy, reference = policy / counts, reference / counts
    return dpo_loss(policy[:PAIRS], policy[PAIRS:], reference[:PAIRS], reference[PAIRS:], args, summed=summed)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_the_sigmoid_loss_and_its_rewards_equal_trls(seed, beta):
    inputs, per_token, reference, counts = _batch(seed)
    terms = glmtune_terms(per_token, reference, counts, DpoArgs(beta=beta))
    loss, metrics = trl_terms(inputs, per_token, "sigmoid", beta)
    torch.testing.assert_close(terms.losses.mean(), loss)
    margins = terms.chosen_rewards - terms.rejected_rewards
    assert metrics["rewards/chosen"] == pytest.approx(terms.chosen_rewards.mean().item(), rel=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(terms.rejected_rewards.mean().item(), rel=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(margins.mean().item(), rel=1e-6, abs=1e-7)
    assert metrics["rewards/accuracies"] == pytest.approx((margins > 0).float().mean().item())
    assert metrics["logps/chosen"] == pytest.approx(per_token[:PAIRS].sum(1).mean().item(), rel=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_equals_trls_conservative_dpo(eps):
    inputs, per_token, reference, counts = _batch(2)
    terms = glmtune_terms(per_token, reference, counts, DpoArgs(beta=0.2, label_smoothing=eps))
    for pair in range(PAIRS):  # one pair per call: aot's sort is then the identity
        rows = [pair, PAIRS + pair]
        single = {key: value[rows] for key, value in inputs.items() if not key.startswith("ref_")}
        single["ref_chosen_logps"] = inputs["ref_chosen_logps"][pair : pair + 1]
        single["ref_rejected_logps"] = inputs["ref_rejected_logps"][pair : pair + 1]
        loss, _ = trl_terms(single, per_token[rows], "aot", 0.2, eps)
        torch.testing.assert_close(terms.losses[pair], loss)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_the_ipo_loss_equals_trls(beta):
    inputs, per_token, reference, counts = _batch(3)
    terms = glmtune_terms(per_token, reference, counts, DpoArgs(beta=beta, loss="ipo"))
    loss, _ = trl_terms(inputs, per_token, "ipo", beta)
    torch.testing.assert_close(terms.losses.mean(), loss)


def test_the_ipo_rewards_equal_trls():
    inputs, per_token, reference, counts = _batch(3)
    terms = glmtune_terms(per_token, reference, counts, DpoArgs(beta=0.1, loss="ipo"))
    _, metrics = trl_terms(inputs, per_token, "ipo", 0.1)
    assert metrics["rewards/chosen"] == pytest.approx(terms.chosen_rewards.mean().item(), rel=1e-6)
