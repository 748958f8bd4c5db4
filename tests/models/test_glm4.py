"""GLM-4-9B-Chat: glmtune's ChatGLM2 network (rotary base 10000 * rope_ratio) against the published code's
golden outputs on glm-4-9b-chat-tiny, and generation stopping on any id of the config's eos list."""

from __future__ import annotations

import json

import pytest
import torch

from glmtune.inference.engine import ChatEngine
from glmtune.models.chatglm2 import ChatGLM2ForConditionalGeneration
from glmtune.models.loading import load_model
from glmtune.tokenizers.glm4 import GLM4Tokenizer
from glmtune.tokenizers.template_choice import get_template

FOLDER = "glm-4-9b-chat-tiny"
TOL = 1e-4  # max abs logits difference vs the published implementation
EOS = [151329, 151336, 151338]  # <|endoftext|> <|user|> <|observation|>, the published config's list


@pytest.fixture(scope="module")
def golden(reference_dir):
    return torch.load(reference_dir / FOLDER / "golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def model(reference_dir) -> ChatGLM2ForConditionalGeneration:
    # The GLM-4 network is ChatGLM2/3's: the folder is detected as glm4 and built with the ChatGLM2 classes.
    loaded = load_model(reference_dir / FOLDER, torch_dtype="float32")
    assert type(loaded) is ChatGLM2ForConditionalGeneration and loaded.glmtune_family == "glm4"
    return loaded


def max_diff_real(logits: torch.Tensor, expected: torch.Tensor, golden: dict) -> float:
    """Max abs difference at the golden vocab columns and at real (not left-padding) positions."""
    real = golden["batch"]["attention_mask"].bool()
    return (logits[..., golden["vocab_index"]] - expected)[real].abs().max().item()


def test_config_values_are_the_published_ones(model, reference_dir) -> None:
    published = json.loads((reference_dir / FOLDER / "config.json").read_text())
    assert model.config.rope_ratio == published["rope_ratio"] == 500
    assert model.config.layernorm_epsilon == published["layernorm_epsilon"]
    assert (
        model.config.eos_token_id == model.generation_config.eos_token_id == published["eos_token_id"] == EOS
    )
    assert model.config.padded_vocab_size == 151552


def test_logits_match_golden(model, golden) -> None:
    with torch.no_grad():
        logits = model(**golden["batch"]).logits
    assert max_diff_real(logits, golden["logits"], golden) <= TOL
    # the rotary base decides it: the same weights with rope_ratio 1 are far off
    plain = ChatGLM2ForConditionalGeneration(
        type(model.config)(**{**model.config.to_dict(), "rope_ratio": 1})
    )
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert max_diff_real(plain.float().eval()(**golden["batch"]).logits, golden["logits"], golden) > 1e-3


def test_train_loss_and_logits_match_golden(model, golden) -> None:
    train = golden["train"]
    with torch.no_grad():
        out = model(input_ids=train["input_ids"], labels=train["labels"])
    assert (out.loss - train["loss"]).abs().item() <= 1e-5
    assert (out.logits[..., golden["vocab_index"]] - train["logits"]).abs().max().item() <= TOL


def test_greedy_generate_matches_golden(model, golden) -> None:
    out = model.generate(
        **golden["batch"],
        max_new_tokens=8,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, golden["generate"]["output_ids"])
    steps = torch.stack(out.scores[:4])[..., golden["vocab_index"]]
    assert (steps - golden["generate"]["step_logits"]).abs().max().item() <= TOL
    assert not set(out.sequences[:, golden["batch"]["input_ids"].shape[1] :].flatten().tolist()) & set(EOS)


def test_generate_stops_on_any_id_of_an_eos_list(model, golden) -> None:
    """Each row stops at the first id of the list it emits and is padded after it; the other row goes on."""
    batch, expected = golden["batch"], golden["generate"]["output_ids"]
    start = batch["input_ids"].shape[1]
    first, second = expected[0, start].item(), expected[1, start + 2].item()
    assert first not in expected[1, start:].tolist() and second not in expected[0, start:].tolist()
    out = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=[*EOS, first, second])
    assert out[0, start:].tolist() == [first] + [151329] * 2  # padded (pad id) until the other row stops
    assert out[1, start:].tolist() == expected[1, start : start + 3].tolist()


def test_chat_engine_stops_on_the_templates_eos_list(model, reference_dir, monkeypatch) -> None:
    tokenizer = GLM4Tokenizer.from_pretrained(str(reference_dir / FOLDER))
    template = get_template("glm4", tokenizer)
    engine = ChatEngine(model, tokenizer, template)
    prompt = template.build_chat_prompt("你好").input_ids
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :]
    assert engine._generate_kwargs({})["eos_token_id"] == EOS
    done = engine.complete("你好", max_new_tokens=6)
    assert done.finish_reason == "length"
    assert done.text == tokenizer.decode(greedy.tolist(), skip_special_tokens=True).strip()
    # an answer that reaches one of the list's ids ends there: make the model's 3rd token a stop id
    stops = [*EOS, greedy[2].item()]
    monkeypatch.setattr(type(template), "stop_token_ids", property(lambda self: stops))
    done = engine.complete("你好", max_new_tokens=6)
    assert done.finish_reason == "stop" and done.completion_tokens == 2
    assert done.text == tokenizer.decode(greedy[:2].tolist(), skip_special_tokens=True).strip()


def test_the_glm4_folder_is_its_own_family(reference_dir) -> None:
    from glmtune.config import ConfigError
    from glmtune.models.families import detect_family
    from glmtune.models.loading import load_tokenizer
    from glmtune.tokenizers.template_choice import resolve_template_name

    folder = reference_dir / FOLDER
    assert detect_family(folder) == "glm4"
    assert detect_family(reference_dir / "chatglm3-6b-tiny") == "chatglm3"
    assert detect_family(reference_dir / "chatglm2-6b-tiny") == "chatglm2"
    assert isinstance(load_tokenizer(folder), GLM4Tokenizer)
    assert resolve_template_name("auto", "glm4") == "glm4"
    for wrong, other in (("chatglm3", folder), ("glm4", reference_dir / "chatglm3-6b-tiny")):
        with pytest.raises(ConfigError, match=f"family {wrong!r} given"):
            load_model(other, family=wrong)


def run_script(script: str, *flags: str) -> str:
    """`python script flags...` from the repository root, as a user runs it; its stdout, or the failure's
    output tails."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    result = subprocess.run(
        [sys.executable, script, *flags], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


# What each method adds to the default config's flags, and the script that chats with its result.
SCRIPT_METHODS = {
    "lora": ([], "infer_lora_finetuning.py"),
    # P-Tuning v2: the published recipe's prefix learning rate order (2e-2), a short prefix
    "ptv2": (["--method", "ptv2", "--ptv2.pre_seq_len", "8", "--train.learning_rate", "0.02"], "infer_finetuning.py"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SCRIPT_METHODS))
def test_glm4_through_the_scripts(reference_dir, tmp_path, method) -> None:
    """data_utils.py, train.py (LoRA or P-Tuning v2) and the method's inference script --predict on the
    published GLM-4 folder."""
    extra, infer_script = SCRIPT_METHODS[method]
    flags = [
        "--model.path", str(reference_dir / FOLDER), "--data.output_dir", str(tmp_path / "records"),
        "--train.output_dir", str(tmp_path / "run"), "--train.max_steps", "2", "--train.batch_size", "2",
        *extra,
    ]  # fmt: skip

    run_script("data_utils.py", *flags)
    run_script("train.py", *flags)
    final = tmp_path / "run" / "final"
    run_config = (final / "hyperparameters.yaml").read_text()
    assert "template: auto" in run_config and f"method: {method}" in run_config
    if method == "ptv2":
        assert set(torch.load(final / "pytorch_model.bin", weights_only=True)) == {
            "transformer.prefix_encoder.embedding.weight"
        }
    answers = run_script(infer_script, *flags, "--predict", "data/dev.json", "--limit", "2")
    assert answers.strip().splitlines()[-1].startswith("exact match: ")


@pytest.mark.parametrize("flag", [("--train.precision", "16-true"), ("--model.dtype", "float16")])
def test_glm4_refuses_fp16_training(reference_dir, tmp_path, capsys, flag) -> None:
    from train import main

    argv = ["--model.path", str(reference_dir / FOLDER), "--train.output_dir", str(tmp_path / "run"), *flag]
    assert main(argv) == 1
    assert "GLM-4 overflows in fp16" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
