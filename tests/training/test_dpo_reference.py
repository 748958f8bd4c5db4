"""DPO's reference for every method: P-Tuning v2 with its prefix switched off, full and freeze with a frozen
copy taken before training. Each reference's log-probabilities are the base model's, however far the policy
has moved; and train.py runs DPO with them."""

import json

import pytest
import torch

from glmtune.config import DpoArgs
from glmtune.training.preference import DPOModule, sequence_log_probs

from .conftest import make_cfg


def pair_batch() -> dict[str, torch.Tensor]:
    from glmtune.data.preference import PairCollator, pair_record

    items = [{k: torch.from_numpy(v) for k, v in pair_record([5, 6, 7], [8, 9, 2], [10, 2]).items()}]
    return PairCollator(pad_token_id=0)(items)


def answer_log_probs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        return sequence_log_probs(out.hidden_states[-1], model.get_output_embeddings(), batch["labels"])[0]


def test_ptv2_reference_is_the_model_without_its_prefix(tiny_chatglm2, tiny_data, tmp_path):
    from glmtune.models.loading import load_model
    from glmtune.training.methods import apply_method
    from glmtune.training.trainer import load_for_method

    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", method="ptv2")
    base = load_model(tiny_chatglm2).eval()
    policy = apply_method(load_for_method(cfg), cfg, 10).eval()
    with torch.no_grad():  # a prefix that changes the answers
        policy.transformer.prefix_encoder.embedding.weight.normal_(0, 1.0)
    batch = pair_batch()
    module = DPOModule(policy, cfg.train, 10, method="ptv2", dpo=DpoArgs())
    with_prefix = answer_log_probs(policy, batch)
    torch.testing.assert_close(module.reference_log_probs(batch), answer_log_probs(base, batch))
    assert not torch.allclose(with_prefix, answer_log_probs(base, batch))
    torch.testing.assert_close(answer_log_probs(policy, batch), with_prefix)  # the prefix is back on


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_and_freeze_reference_is_a_copy_from_before_training(tiny_chatglm2, tiny_data, tmp_path, method):
    from glmtune.models.loading import load_model
    from glmtune.training.methods import apply_method
    from glmtune.training.preference import frozen_copy

    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", method=method)
    base = load_model(tiny_chatglm2).eval()
    policy = apply_method(load_model(tiny_chatglm2), cfg, 10)
    module = DPOModule(
        policy, cfg.train, 10, method=method, dpo=DpoArgs(), reference_model=frozen_copy(policy)
    )
    with torch.no_grad():  # a training step's worth of change to every trainable weight
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    batch = pair_batch()
    torch.testing.assert_close(module.reference_log_probs(batch), answer_log_probs(base, batch))
    assert not torch.allclose(answer_log_probs(policy.eval(), batch), answer_log_probs(base, batch))
    assert all(not p.requires_grad for p in module.reference_model.parameters())
    assert not any(k.startswith("reference") for k in module.state_dict()), "the copy would be checkpointed"


@pytest.mark.parametrize("method", ["ptv2", "freeze"])
def test_train_py_stage_dpo_with_ptv2_and_freeze(tiny_chatglm2, tmp_path, method):
    import train
    from tests.conftest import REPO_ROOT

    out = tmp_path / "run"
    argv = [
        "--config", str(REPO_ROOT / "config" / "dpo.yaml"), "--method", method, "--model.path", str(tiny_chatglm2),
        "--data.output_dir", str(tmp_path / "records"), "--train.output_dir", str(out), "--train.max_epochs", "1",
        "--ptv2.pre_seq_len", "4", "--train.eval_generate", "2",
    ]  # fmt: skip
    assert train.main(argv) == 0
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert {"val_reward_accuracy", "val_reward_margin", "train_logps_chosen"} <= set(metrics), metrics
    assert "val_exact_match" in metrics  # eval_generate answered the eval pairs' prompts
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert not any("reference" in k for k in checkpoint["state_dict"])


def test_eval_generate_is_refused_for_a_reward_model(tiny_chatglm2, tiny_data, tmp_path):
    from glmtune.config import ConfigError
    from glmtune.training.trainer import check_config

    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run")
    cfg.stage, cfg.train.eval_generate = "reward", 2
    with pytest.raises(ConfigError, match="train.eval_generate=2 is not supported with stage: reward"):
        check_config(cfg)


def test_ipo_scores_averaged_log_probs_and_rewards_summed_ones(tiny_chatglm2, tiny_data, tmp_path):
    """DPOModule with the IPO loss: the loss reads log-probs averaged over each answer's tokens, the logged
    rewards beta times the summed log-ratio (as for DPO, and as TRL reports them)."""
    from glmtune.models.loading import load_model
    from glmtune.training.methods import apply_method
    from glmtune.training.preference import dpo_loss

    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run")
    policy = apply_method(load_model(tiny_chatglm2), cfg, 10).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    seen = []

    class Recording(DPOModule):
        def _log_terms(self, terms, policy_logps, pairs):
            seen.append(terms)

    args = DpoArgs(beta=0.2, loss="ipo")
    module = Recording(policy, cfg.train, 10, dpo=args)
    batch = pair_batch()
    with torch.no_grad():
        outputs = policy(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        loss = module.loss(batch, outputs)
    summed_policy = answer_log_probs(policy, batch)
    summed_reference = module.reference_log_probs(batch)
    count = (batch["labels"][:, 1:] != -100).sum(1)
    mean_p, mean_r = summed_policy / count, summed_reference / count
    expected = dpo_loss(mean_p[:1], mean_p[1:], mean_r[:1], mean_r[1:], args)
    torch.testing.assert_close(loss, expected.losses.mean())
    torch.testing.assert_close(seen[0].chosen_rewards, 0.2 * (summed_policy[:1] - summed_reference[:1]))
    torch.testing.assert_close(seen[0].rejected_rewards, 0.2 * (summed_policy[1:] - summed_reference[1:]))
