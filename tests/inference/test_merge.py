"""`infer_lora_finetuning.py --merge OUT`: the merged folder computes what base + adapter computes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from glmtune.inference.artifacts import load_base, load_finetuned, load_lora
from glmtune.inference.merge import MergeError, merge_and_save
from tests.inference.conftest import run_script, task_config

QUERIES = ["山间茶舍几点开门？", "绿茶用多少度的水冲泡？"]


def logits(engine, queries=QUERIES) -> torch.Tensor:
    batch = engine._batch([engine.prompt_ids(q) for q in queries])
    with torch.no_grad():
        return engine.model(**batch).logits.float()


@pytest.fixture(scope="module")
def merged_folder(lora_adapter, tmp_path_factory):
    from infer_lora_finetuning import main

    out = tmp_path_factory.mktemp("merge") / "merged"
    assert main(["--checkpoint", str(lora_adapter), "--merge", str(out)]) == 0
    return out


@pytest.mark.slow
def test_merge_cli_writes_a_folder_with_the_same_logits(lora_adapter, tiny_model, merged_folder):
    adapted = load_lora(task_config(), lora_adapter)
    expected = logits(adapted)
    base = logits(load_base(task_config("--model.path", str(tiny_model))))
    assert (expected - base).abs().max() > 1e-2, (
        "the adapter must change the model for this test to mean much"
    )

    # infer.py's loader: no adapter, no PEFT, the published ChatGLM2 layout with its tokenizer.
    out = merged_folder
    assert {"config.json", "model.safetensors", "tokenizer.model", "hyperparameters.yaml"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "adapter_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["glmtune_family"] == "chatglm2"
    merged = load_base(task_config("--model.path", str(out)))
    assert not any("lora" in name for name, _ in merged.model.named_parameters())
    assert torch.allclose(logits(merged), expected, atol=1e-4, rtol=0)
    assert merged.chat(QUERIES[0])[0] == adapted.chat(QUERIES[0])[0]

    # The hyperparameters make it a "full" result for infer_finetuning.py too.
    run = yaml.safe_load((out / "hyperparameters.yaml").read_text())
    assert run["method"] == "full" and run["model"]["path"] == str(out) and run["model"]["tiny"] is None
    assert torch.allclose(logits(load_finetuned(task_config(), out)), expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_scripts_answer_with_the_merged_folder_as_with_the_adapter(lora_adapter, merged_folder, tmp_path):
    data = tmp_path / "items.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": q, "completion": "?"}, ensure_ascii=False) + "\n" for q in QUERIES)
    )
    adapted = load_lora(task_config("--generation.max_new_tokens", "16"), lora_adapter)
    expected = [adapted.chat(q)[0] for q in QUERIES]
    for script, target in [("infer.py", "--model.path"), ("infer_finetuning.py", "--checkpoint")]:
        out = tmp_path / f"{script}.jsonl"
        proc = run_script(
            script, target, str(merged_folder), "--predict", str(data), "--out", str(out),
            "--generation.max_new_tokens", "16",
        )  # fmt: skip
        assert [json.loads(line)["prediction"] for line in out.read_text().splitlines()] == expected
        assert proc.stdout.strip().splitlines()[-1] == "exact match: 0/2"


def test_merge_refuses_a_non_empty_folder(lora_adapter, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        merge_and_save(load_lora(task_config(), lora_adapter), tmp_path)


@pytest.mark.parametrize("bits", [8, 4])
def test_merging_into_a_quantized_base_says_to_use_the_unquantized_weights(
    lora_adapter, tmp_path, capsys, bits
):
    from infer_lora_finetuning import main

    out = tmp_path / "merged"
    flags = ["--checkpoint", str(lora_adapter), "--model.quantization_bit", str(bits), "--merge", str(out)]
    assert main(flags) == 1
    err = capsys.readouterr().err
    assert f"quantization_bit {bits}" in err and "unquantized weights" in err
    assert not out.exists()


def tiny_llama(folder):
    """A transformers (non-ChatGLM) causal LM with a fast tokenizer of its own, saved in `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "</s>", *"山间茶舍几点开门绿用多少度的水冲泡？"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_merge_writes_transformers_format_for_other_models(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glmtune.inference.engine import ChatEngine
    from glmtune.models.loading import load_model

    tokenizer = tiny_llama(tmp_path / "llama")
    model = get_peft_model(load_model(tmp_path / "llama"), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    text = "山间茶舍几点开门？"
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base = load_model(tmp_path / "llama")(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-2

    out = merge_and_save(ChatEngine(model=model, tokenizer=tokenizer, template=None), tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(out).encode(text) == tokenizer.encode(text)


@pytest.mark.parametrize("method", ["full", "freeze", "ptv2"])
def test_merge_refuses_a_run_without_an_adapter(method, tmp_path):
    with pytest.raises(MergeError, match=f"a {method} result has no adapter to merge"):
        merge_and_save(None, tmp_path / "out", run_config={"method": method})
    assert not (tmp_path / "out").exists()
