"""The reward model (`stage: reward`): the loss, the last real token, the head on every model family, the
artifact that reloads as a scorer with the rewards training saw, the refusals, and a run through train.py
that learns to score the chosen answers higher."""

import json
import math
from dataclasses import replace

import pytest
import torch

from glmtune.config import ConfigError
from glmtune.models.value_head import (
    VALUE_HEAD_FILE,
    RewardModel,
    last_token_index,
    last_token_rewards,
    new_value_head,
)
from glmtune.training.reward import RewardModule, pairwise_reward_loss
from glmtune.training.trainer import check_config
from tests.conftest import REPO_ROOT

from .conftest import make_cfg

PAIRS = {
    "train": REPO_ROOT / "data" / "samples" / "preference_train.jsonl",
    "dev": REPO_ROOT / "data" / "samples" / "preference_dev.jsonl",
}


def test_the_loss_is_minus_log_sigmoid_of_the_reward_difference():
    chosen, rejected = torch.tensor([2.0, 0.0, 30.0]), torch.tensor([0.0, 1.0, -30.0])
    losses = pairwise_reward_loss(chosen, rejected)
    expected = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(1.0)), math.log1p(math.exp(-60.0))]
    torch.testing.assert_close(losses, torch.tensor(expected))
    # Only the difference counts, and a large margin neither overflows nor rounds the gradient away.
    torch.testing.assert_close(pairwise_reward_loss(chosen + 5, rejected + 5), losses)
    chosen.requires_grad_(True)
    pairwise_reward_loss(chosen, rejected).sum().backward()
    torch.testing.assert_close(chosen.grad, -torch.sigmoid(-(chosen - rejected)).detach())


def test_the_last_real_token_whichever_side_the_padding_is_on():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="without any real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_head_reads_the_hidden_state_at_the_last_real_token(side):
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 4, 8), new_value_head(8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]] if side == "right" else [[0, 0, 1, 1], [1, 1, 1, 1]])
    last = [1, 3] if side == "right" else [3, 3]
    expected = torch.stack([head(hidden[0, last[0]]), head(hidden[1, last[1]])]).squeeze(-1)
    torch.testing.assert_close(last_token_rewards(hidden, mask, head), expected)
    # In half precision the backbone's hidden state is read in the head's fp32.
    half = last_token_rewards(hidden.to(torch.bfloat16), mask, head)
    assert half.dtype == torch.float32


def _family_models(reference_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from glmtune.models.loading import load_model

    for name in ("chatglm-6b-tiny", "chatglm2-6b-tiny", "chatglm3-6b-tiny", "glm-4-9b-chat-tiny"):
        yield name, load_model(reference_dir / name, torch_dtype="float32")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    yield "transformers llama", LlamaForCausalLM(config)


def test_the_head_scores_each_family_and_padding_changes_no_reward(reference_dir):
    """ChatGLM-6B, ChatGLM2, ChatGLM3, GLM-4 and a transformers model: a right-padded batch gives each sequence
    the reward it has alone (the head reads its last real token), and the loss reaches the head and the
    backbone."""
    for name, backbone in _family_models(reference_dir):
        torch.manual_seed(1)
        model = RewardModel(backbone.eval())
        vocab = backbone.get_input_embeddings().num_embeddings
        # Ordinary tokens (well inside the vocabulary: ChatGLM's special ids sit at its end).
        rows = [torch.randint(10, min(vocab, 100), (n,)) for n in (7, 4)]
        if name == "chatglm-6b-tiny":  # ChatGLM-6B needs its [gMASK] <sop> (the tokenizer's prefix)
            gmask, bos = backbone.config.gmask_token_id, backbone.config.bos_token_id
            rows = [torch.cat([r[:-3], torch.tensor([gmask, bos]), r[-1:]]) for r in rows]
        alone = torch.cat([model(r[None], torch.ones(1, len(r), dtype=torch.long)) for r in rows])
        ids = torch.zeros(2, 7, dtype=torch.long)
        mask = torch.zeros(2, 7, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        batched = model(ids, mask)
        assert batched.shape == (2,), name
        torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4, msg=name)
        pairwise_reward_loss(batched[:1], batched[1:]).sum().backward()
        assert model.value_head.weight.grad.abs().sum() > 0, name
        grads = [p.grad for p in backbone.parameters() if p.grad is not None]
        assert any(g.abs().sum() > 0 for g in grads), name


def _reward_cfg(model_dir, tmp_path, method):
    cfg = make_cfg(model_dir, {"train": PAIRS["train"], "dev": PAIRS["dev"]}, tmp_path / "run", method=method)
    cfg.stage = "reward"
    cfg.data.output_dir = str(tmp_path / "records")
    cfg.train.max_epochs = 1
    cfg.train.learning_rate = 1e-3
    cfg.freeze.num_trainable_layers = 1
    return cfg


@pytest.mark.parametrize(
    ("model", "method"),
    [
        ("chatglm2", "lora"),
        ("chatglm2", "full"),
        ("chatglm2", "freeze"),
        ("chatglm2", "ptv2"),
        ("chatglm", "lora"),
        ("chatglm3-6b-tiny", "lora"),
        ("glm-4-9b-chat-tiny", "lora"),
    ],
)
def test_the_artifact_reloads_as_a_scorer_giving_the_rewards_of_training(request, tmp_path, model, method):
    from glmtune.inference.reward import load_reward_scorer, predict_pairs
    from glmtune.training.trainer import train

    # The training fixtures' tiny models, or a reference folder as published (only read).
    folder = request.getfixturevalue("reference_dir") / model if "-" in model else None
    cfg = _reward_cfg(folder or request.getfixturevalue(f"tiny_{model}"), tmp_path, method)
    cfg.train.eval_batch_size = 8  # the 8 dev pairs in one evaluation batch
    result = train(cfg, enable_progress_bar=False)
    final = result.artifact_dir
    assert (final / VALUE_HEAD_FILE).is_file()
    # The head is in the checkpoints (resume) and in best/ (the lowest val_loss) too.
    checkpoint = torch.load(result.checkpoint_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert {"value_head.weight", "value_head.bias"} <= set(checkpoint["state_dict"])
    assert (result.best_artifact_dir / VALUE_HEAD_FILE).is_file()
    if method == "full":  # a model folder, but not one to chat with (infer.py --model.path FOLDER)
        from glmtune.inference.artifacts import load_base

        with pytest.raises(ConfigError, match="a reward model .* --predict PAIRS"):
            load_base(replace(cfg, model=replace(cfg.model, path=str(final))))
    assert {"val_reward_accuracy", "val_reward_margin", "train_reward_accuracy"} <= set(result.metrics)
    saved = json.loads((final / "metrics.json").read_text())
    assert saved["val_reward_margin"] == pytest.approx(result.metrics["val_reward_margin"])

    scorer = load_reward_scorer(cfg, final)
    summary = predict_pairs(scorer, PAIRS["dev"], out=tmp_path / "scored.jsonl", show=False)
    assert summary["pairs"] == 8
    assert summary["reward_margin"] == pytest.approx(result.metrics["val_reward_margin"], abs=1e-4)
    assert summary["reward_accuracy"] == pytest.approx(result.metrics["val_reward_accuracy"])
    rows = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == "山间茶舍几点开门？" and isinstance(rows[0]["chosen_reward"], float)
    written = json.loads((tmp_path / "scored.metrics.json").read_text())
    assert written["reward_accuracy"] == summary["reward_accuracy"]
    # One score is one row of the batch: the same reward alone as in the pairs' batch.
    assert scorer.score(rows[0]["prompt"], rows[0]["chosen"]) == pytest.approx(
        rows[0]["chosen_reward"], abs=1e-4
    )


def test_the_head_and_the_adapter_both_train_and_the_lm_head_does_not(tiny_chatglm2, tmp_path):
    from glmtune.models.loading import load_model
    from glmtune.training.methods import apply_method
    from glmtune.training.reward import freeze_unused_output_layer

    cfg = _reward_cfg(tiny_chatglm2, tmp_path, "full")
    model = apply_method(load_model(tiny_chatglm2), cfg, 10)
    freeze_unused_output_layer(model)
    module = RewardModule(model, cfg.train, 10, method="full")
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    assert {"value_head.weight", "value_head.bias"} <= trained
    assert "model.transformer.output_layer.weight" not in trained
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(module.value_head.weight) in in_optimizer and len(in_optimizer) == len(trained)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data.packing": True}, "data.packing=True is not supported with stage: reward"),
        ({"train.eval_generate": 2}, "train.eval_generate=2 is not supported with stage: reward"),
        ({"train.strategy": "fsdp"}, "stage: reward does not support train.strategy=fsdp"),
    ],
)
def test_unsupported_settings_are_refused(tiny_chatglm2, tmp_path, change, message):
    cfg = _reward_cfg(tiny_chatglm2, tmp_path, "lora")
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


@pytest.mark.parametrize("method", ["full", "freeze", "ptv2", "ia3"])
def test_every_method_is_accepted(tiny_chatglm2, tmp_path, method):
    check_config(_reward_cfg(tiny_chatglm2, tmp_path, method))


def test_a_sft_or_dpo_result_is_no_scorer(tiny_chatglm2, tmp_path):
    from glmtune.inference.reward import load_reward_scorer
    from glmtune.training.trainer import write_hparams

    cfg = _reward_cfg(tiny_chatglm2, tmp_path, "lora")
    cfg.stage = "dpo"
    write_hparams(cfg, tmp_path / "dpo")
    with pytest.raises(ConfigError, match="trained with stage 'dpo', not reward"):
        load_reward_scorer(cfg, tmp_path / "dpo")


@pytest.mark.slow
def test_train_py_stage_reward_prefers_the_chosen_answers_and_predict_prints_its_accuracy(
    tmp_path, monkeypatch, capsys
):
    import yaml

    import infer_finetuning
    import infer_lora_finetuning
    import train
    from glmtune.config import DEFAULT_CONFIG, TinyModelArgs
    from glmtune.demo.tiny import build_tiny_chatglm2
    from glmtune.inference.artifacts import load_finetuned
    from glmtune.inference.cli import inference_main

    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "reward"
    # model.path outside output/tiny-chatglm2 must hold a checkpoint: build the embedded default's there.
    tiny = yaml.safe_load(DEFAULT_CONFIG.read_text())["model"]["tiny"]
    tiny["texts"] = [str(REPO_ROOT / t) for t in tiny["texts"]]
    build_tiny_chatglm2(tmp_path / "model", TinyModelArgs(**tiny))
    argv = [
        "--config", "config/reward.yaml", "--train.output_dir", str(out),
        "--data.output_dir", str(tmp_path / "records"), "--model.path", str(tmp_path / "model"),
    ]  # fmt: skip
    assert train.main(argv) == 0
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["val_reward_accuracy"] >= 0.9, metrics
    assert metrics["val_reward_margin"] > 0
    assert (out / "final" / "adapter_config.json").is_file() and (out / "final" / VALUE_HEAD_FILE).is_file()
    capsys.readouterr()

    scored = tmp_path / "scored.jsonl"
    predict = ["--checkpoint", str(out / "final"), "--predict", "data/samples/preference_dev.jsonl"]
    assert infer_lora_finetuning.main([*predict, "--out", str(scored)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(scored.with_suffix(".metrics.json").read_text())
    assert printed[-1] == f"reward accuracy: {summary['reward_accuracy_count']}/8"
    assert summary["reward_accuracy"] == pytest.approx(metrics["val_reward_accuracy"])
    # Any inference script loads it (the loader follows its method); a reward model does not chat.
    assert inference_main(infer_finetuning.__doc__, load_finetuned, predict) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == printed[-1]
    assert infer_lora_finetuning.main(["--checkpoint", str(out / "final")]) == 1
    assert "is a reward model: it scores answers" in capsys.readouterr().err
    assert (
        infer_lora_finetuning.main(["--checkpoint", str(out / "final"), "--merge", str(tmp_path / "m")]) == 1
    )
    assert "--merge would drop its value head" in capsys.readouterr().err


def test_train_py_ends_a_bad_dialogue_pair_with_its_file_line_and_field(tiny_chatglm2, tmp_path, capsys):
    import train

    pairs = tmp_path / "pairs.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
    bad = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], **good}
    del bad["messages"]
    pairs.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    argv = [
        "--stage", "reward", "--model.path", str(tiny_chatglm2), "--data.train_files", f"[{pairs}]",
        "--data.eval_files", "[]", "--data.output_dir", str(tmp_path / "records"),
        "--train.output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: {pairs}:2: field 'conversations': the prompt's last message must be the user's" in err


def test_the_tuner_trains_a_reward_model_that_scores_and_does_not_chat(tiny_chatglm2, tmp_path):
    from glmtune import Tuner

    tuner = Tuner(tiny_chatglm2, "lora", train={"accelerator": "cpu", "eval_batch_size": 8})
    tuner.load_data(PAIRS["train"], PAIRS["dev"], max_seq_length=48, output_dir=str(tmp_path / "records"))
    metrics = tuner.tune(stage="reward", max_epochs=1, batch_size=4, output_dir=str(tmp_path / "run"))
    assert tuner.cfg.stage == "reward" and "val_reward_accuracy" in metrics
    summary = tuner.eval()  # data.eval_files: the dev pairs
    assert summary["pairs"] == 8
    assert summary["reward_margin"] == pytest.approx(metrics["val_reward_margin"], abs=1e-4)
    assert isinstance(tuner.score("山间茶舍几点开门？", "每天早上九点开门。"), float)
    with pytest.raises(ConfigError, match="is a reward model"):
        tuner.chat("你好")
    reloaded = Tuner(tiny_chatglm2).load_pretrained(tmp_path / "run" / "final")
    assert reloaded.score("山间茶舍几点开门？", "每天早上九点开门。") == tuner.score(
        "山间茶舍几点开门？", "每天早上九点开门。"
    )


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_transformers_reward_model_reloads_as_a_scorer(tmp_path, method):
    from glmtune.inference.reward import load_reward_scorer, predict_pairs
    from glmtune.training.trainer import train
    from tests.inference.test_merge import tiny_llama

    tiny_llama(tmp_path / "model")  # a transformers LlamaForCausalLM with its own fast tokenizer
    cfg = _reward_cfg(tmp_path / "model", tmp_path, method)
    cfg.data.template, cfg.data.max_seq_length = "chatml", 256
    cfg.train.eval_batch_size = 8
    result = train(cfg, enable_progress_bar=False)
    summary = predict_pairs(load_reward_scorer(cfg, result.artifact_dir), PAIRS["dev"], show=False)
    assert summary["reward_margin"] == pytest.approx(result.metrics["val_reward_margin"], abs=1e-5)
    assert summary["reward_margin"] != 0
