"""DPO (`stage: dpo`): the loss against TRL's formulas, the reference (the adapter disabled), the refusals, and
a run through train.py that learns to prefer the chosen answers."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from glmtune.config import ConfigError, DpoArgs
from glmtune.training.preference import DPOModule, dpo_loss, sequence_log_probs
from glmtune.training.trainer import check_config
from tests.conftest import REPO_ROOT

from .conftest import make_cfg


def trl_sigmoid_terms(pc, pr, rc, rr, beta, eps):
    """TRL's DPOTrainer.dpo_loss, loss_type "sigmoid" with label_smoothing (conservative DPO), written as TRL
    writes it: logits = (pi_logratios - ref_logratios), rewards beta * (policy - reference)."""
    logits = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    return losses, beta * (pc - rc), beta * (pr - rr)


LOG_PROBS = [
    torch.tensor(v)
    for v in ([-12.0, -30.5, -7.25], [-15.0, -29.0, -9.0], [-13.0, -30.0, -8.0], [-14.0, -31.0, -8.5])
]


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_sigmoid_loss_and_rewards_equal_trl(eps):
    args = DpoArgs(beta=0.3, label_smoothing=eps)
    terms = dpo_loss(*LOG_PROBS, args)
    losses, chosen, rejected = trl_sigmoid_terms(*LOG_PROBS, 0.3, eps)
    torch.testing.assert_close(terms.losses, losses)
    torch.testing.assert_close(terms.chosen_rewards, chosen)
    torch.testing.assert_close(terms.rejected_rewards, rejected)
    # One pair by hand: margin (-12 + 13) - (-15 + 14) = 2.
    expected = -(1 - eps) * math.log(1 / (1 + math.exp(-0.6))) - eps * math.log(1 / (1 + math.exp(0.6)))
    assert terms.losses[0].item() == pytest.approx(expected, rel=1e-6)


def test_ipo_loss_is_the_squared_distance_to_half_over_beta():
    terms = dpo_loss(*LOG_PROBS, DpoArgs(beta=0.25, loss="ipo"))
    margin = (LOG_PROBS[0] - LOG_PROBS[2]) - (LOG_PROBS[1] - LOG_PROBS[3])
    torch.testing.assert_close(terms.losses, (margin - 2.0) ** 2)


def test_sequence_log_probs_sum_the_answer_tokens():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 5, 8), torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, 1, 2, 5]])
    total, count = sequence_log_probs(hidden, head, labels)
    log_probs = torch.log_softmax(head(hidden), dim=-1)
    expected = [
        log_probs[0, 1, 3] + log_probs[0, 2, 4],
        sum(log_probs[1, t - 1, labels[1, t]] for t in range(1, 5)),
    ]
    torch.testing.assert_close(total, torch.stack(expected))
    assert count.tolist() == [2, 4]


def test_reference_log_probs_are_the_base_models(tiny_chatglm2, tiny_data, tmp_path):
    from glmtune.data.preference import PairCollator, pair_record
    from glmtune.models.loading import load_model
    from glmtune.training.methods import apply_method

    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run")
    base = load_model(tiny_chatglm2).eval()
    adapted = apply_method(load_model(tiny_chatglm2), cfg, 10).eval()
    with torch.no_grad():  # a trained adapter: B != 0, so the policy differs from the base
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    items = [{k: torch.from_numpy(v) for k, v in pair_record([5, 6, 7], [8, 9, 2], [10, 2]).items()}]
    batch = PairCollator(pad_token_id=0)(items)
    module = DPOModule(adapted, cfg.train, 10, dpo=DpoArgs())
    with torch.no_grad():
        out = base(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        expected, _ = sequence_log_probs(out.hidden_states[-1], base.get_output_embeddings(), batch["labels"])
        policy = adapted(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        policy_lp, _ = sequence_log_probs(
            policy.hidden_states[-1], adapted.get_output_embeddings(), batch["labels"]
        )
    torch.testing.assert_close(module.reference_log_probs(batch), expected)
    assert not torch.allclose(policy_lp, expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "full", "train.strategy": "fsdp"}, "keeps a frozen copy of the model"),
        ({"data.packing": True}, "data.packing=True is not supported with stage: dpo"),
        ({"data.strategy": "slide"}, "data.strategy='slide'"),
    ],
)
def test_unsupported_settings_are_refused(tiny_chatglm2, tiny_data, tmp_path, change, message):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run")
    cfg.stage = "dpo"
    for key, value in change.items():
        owner = cfg
        *path, name = key.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, value)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


@pytest.mark.slow
def test_train_py_stage_dpo_prefers_the_chosen_answers_and_the_adapter_predicts(
    tmp_path, monkeypatch, capsys
):
    import infer_lora_finetuning
    import train

    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "dpo"
    argv = [
        "--config", "config/dpo.yaml", "--train.output_dir", str(out),
        "--data.output_dir", str(tmp_path / "records"), "--model.path", str(tmp_path / "model"),
    ]  # fmt: skip
    # model.path outside output/tiny-chatglm2 must hold a checkpoint: build the embedded default's there.
    import yaml

    from glmtune.config import DEFAULT_CONFIG, TinyModelArgs
    from glmtune.demo.tiny import build_tiny_chatglm2

    tiny = yaml.safe_load(DEFAULT_CONFIG.read_text())["model"]["tiny"]
    tiny["texts"] = [str(REPO_ROOT / t) for t in tiny["texts"]]
    build_tiny_chatglm2(tmp_path / "model", TinyModelArgs(**tiny))
    assert train.main(argv) == 0
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["val_reward_accuracy"] >= 0.9, metrics
    assert metrics["val_reward_margin"] > 0
    assert (out / "final" / "adapter_config.json").is_file()
    predictions = tmp_path / "predictions.jsonl"
    code = infer_lora_finetuning.main(
        ["--checkpoint", str(out / "final"), "--predict", "data/dev.json", "--out", str(predictions)]
    )
    assert code == 0
    from glmtune.data.readers import read_dialogues

    turns = sum(len(d.turns) for d in read_dialogues(REPO_ROOT / "data" / "dev.json"))
    answered = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(answered) == turns and all(isinstance(a["prediction"], str) for a in answered)


def test_a_checkpoint_of_another_stage_does_not_resume(tiny_chatglm2, tiny_data, tmp_path):
    from glmtune.models.loading import load_model
    from glmtune.training.module import CausalLMModule

    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run")
    dpo = DPOModule(load_model(tiny_chatglm2), cfg.train, 10, dpo=DpoArgs())
    saved: dict = {"state_dict": {}}
    dpo.on_save_checkpoint(saved)
    assert saved["glmtune"]["stage"] == "dpo"
    with pytest.raises(ConfigError, match="trained with stage 'dpo', this run uses 'sft'"):
        CausalLMModule(load_model(tiny_chatglm2), cfg.train, 10).on_load_checkpoint(saved)
    with pytest.raises(ConfigError, match="trained with stage 'sft', this run uses 'dpo'"):
        dpo.on_load_checkpoint({"glmtune": {"method": "lora"}})


def test_train_py_ends_a_bad_pair_with_its_file_line_and_field(tiny_chatglm2, tmp_path, capsys):
    import train

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    argv = [
        "--stage", "dpo", "--model.path", str(tiny_chatglm2), "--data.train_files", f"[{pairs}]",
        "--data.eval_files", "[]", "--data.output_dir", str(tmp_path / "records"),
        "--train.output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    assert train.main(argv) == 1
    assert f"error: {pairs}:2: field 'rejected': missing" in capsys.readouterr().err
