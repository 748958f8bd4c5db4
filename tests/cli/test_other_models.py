"""Models whose tokenizer has no pad token (LLaMA, GPT-NeoX / Pythia) through the scripts, as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

SPECIALS = ["<s>", "</s>", "<unk>"]


def train_byte_level_tokenizer(texts: list[str], folder: Path):
    """A byte-level BPE over the project's data, saved as a fast tokenizer with bos/eos/unk but no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(folder)
    return tokenizer


def data_texts() -> list[str]:
    texts = []
    for name in ("train.json", "dev.json"):
        for record in json.loads((REPO_ROOT / "data" / name).read_text(encoding="utf-8")):
            for turn in record["paragraph"]:
                answer = turn["a"] if isinstance(turn["a"], str) else "\n".join(turn["a"])
                texts += [turn["q"], answer]
    return texts


def build_tiny(kind: str, folder: Path) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer = train_byte_level_tokenizer(data_texts(), folder)
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **ids,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        config = GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, **ids
        )
        model = GPTNeoXForCausalLM(config)
    assert config.pad_token_id is None
    model.save_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "template"), [("llama", "llama2"), ("gpt_neox", "chatml")])
def test_models_without_a_pad_token_go_through_the_scripts(tmp_path: Path, kind: str, template: str) -> None:
    model_dir = tmp_path / kind
    build_tiny(kind, model_dir)
    flags = [
        "--model.path", str(model_dir), "--model.tiny", "null", "--data.template", template,
        "--data.output_dir", str(tmp_path / "records"), "--train.output_dir", str(tmp_path / "run"),
        "--lora.target_modules", "null", "--lora.modules_to_save", "null", "--train.max_steps", "3",
        "--train.batch_size", "4",
    ]  # fmt: skip

    def run(script: str, *extra: str) -> str:
        result = subprocess.run(
            [sys.executable, script, *flags, *extra],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        assert "Traceback" not in result.stderr
        return result.stdout

    run("data_utils.py")
    run("train.py")
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()
    answers = run("infer_lora_finetuning.py", "--predict", "data/dev.json", "--limit", "3")
    assert answers.strip().splitlines()[-1].startswith("exact match: ")


@pytest.mark.slow
def test_remote_code_models_need_the_key_through_the_scripts(tmp_path: Path) -> None:
    from tests.models.test_loading import save_remote_code_model

    save_remote_code_model(tmp_path / "remote")
    flags = [
        "--model.path", str(tmp_path / "remote"), "--model.tiny", "null", "--data.template", "llama2",
        "--data.output_dir", str(tmp_path / "records"), "--train.output_dir", str(tmp_path / "run"),
        "--lora.target_modules", "null", "--lora.modules_to_save", "null", "--train.max_steps", "1",
    ]  # fmt: skip

    def run(script: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, script, *flags, *extra],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )

    refused = run("train.py")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: model.path: ")
    assert "model.trust_remote_code: true" in refused.stderr
    trained = run("train.py", "--model.trust_remote_code", "true")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "trust_remote_code is on" in trained.stderr
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()
