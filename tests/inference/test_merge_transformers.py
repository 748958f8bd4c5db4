"""`infer_lora_finetuning.py --merge OUT --merge_format transformers`: ChatGLM2/3 and GLM-4 written as
transformers' own GlmForCausalLM with a fast tokenizer and chat_template, which plain transformers (no
glmtune, no trust_remote_code) opens and answers with exactly glmtune's answers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from glmtune.inference.artifacts import load_base, load_lora
from glmtune.inference.merge import MergeError
from glmtune.inference.transformers_export import ExportError, check_exportable, save_transformers
from glmtune.models.families import model_family
from tests.inference.conftest import REPO, run_script, task_config

MAX_NEW_TOKENS = "16"

# Runs in a fresh interpreter outside the repository: only transformers, the folder and its chat_template.
PLAIN_TRANSFORMERS = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, questions = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
answers, prompts = [], []
for q in questions:
    batch = tok.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**batch, max_new_tokens=int(sys.argv[3]), do_sample=False)
    answers.append(tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    prompts.append(batch["input_ids"][0].tolist())
assert not [m for m in sys.modules if m.startswith("glmtune")]
print(json.dumps({"answers": answers, "prompts": prompts, "model": type(model).__name__}))
"""


def plain_transformers(folder, questions: list[str], tmp_path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(folder), json.dumps(questions), MAX_NEW_TOKENS],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: glmtune cannot be imported by accident
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dev_questions() -> list[str]:
    return [
        turn["q"]
        for item in json.loads((REPO / "data" / "dev.json").read_text("utf-8"))
        for turn in item["paragraph"]
    ]


@pytest.fixture(scope="module")
def trained_adapter(tiny_model, tmp_path_factory):
    """The tiny default trained briefly by train.py (LoRA): enough for distinct, readable answers."""
    runs = tmp_path_factory.mktemp("trained")
    run_script(
        "train.py", "--model.path", str(tiny_model), "--train.max_epochs", "15",
        "--train.output_dir", str(runs / "run"), "--data.output_dir", str(runs / "records"), timeout=900,
    )  # fmt: skip
    return runs / "run" / "final"


@pytest.mark.slow
def test_merged_tiny_default_answers_the_dev_questions_in_plain_transformers(trained_adapter, tmp_path):
    from infer_lora_finetuning import main

    lora_adapter = trained_adapter
    out = tmp_path / "merged"
    assert (
        main(["--checkpoint", str(lora_adapter), "--merge", str(out), "--merge_format", "transformers"]) == 0
    )
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "tokenizer.model" not in files and not any(name.endswith(".py") for name in files)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "glm" and config["architectures"] == ["GlmForCausalLM"]
    assert "auto_map" not in config

    questions = dev_questions()
    adapted = load_lora(task_config("--generation.max_new_tokens", MAX_NEW_TOKENS), lora_adapter)
    expected = [adapted.chat(q)[0] for q in questions]
    assert len(set(expected)) > 1 and all(a and "\ufffd" not in a for a in expected), (
        "the answers must be text and differ between questions for this test to mean much"
    )
    got = plain_transformers(out, questions, tmp_path)
    assert got["model"] == "GlmForCausalLM"
    assert got["prompts"] == [adapted.prompt_ids(q) for q in questions]
    assert got["answers"] == expected


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["chatglm2-6b-tiny", "chatglm3-6b-tiny", "glm-4-9b-chat-tiny"])
def test_published_families_export_with_the_same_logits_prompts_and_answers(reference_dir, tmp_path, folder):
    engine = load_base(
        task_config(
            "--model.path", str(reference_dir / folder), "--generation.max_new_tokens", MAX_NEW_TOKENS
        )
    )
    questions = ["山间茶舍几点开门？", "Hello,  world!\n  What's 1 + 1?"]
    ids = torch.tensor([engine.prompt_ids(questions[1])])
    with torch.no_grad():
        expected_logits = engine.model.float()(input_ids=ids).logits
    out = save_transformers(
        engine.model, engine.tokenizer, engine.template, tmp_path / "out", model_family(engine.model)
    )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    native = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert (native(input_ids=ids).logits - expected_logits).abs().max() <= 1e-4
    tok = AutoTokenizer.from_pretrained(out)
    for text in questions:
        assert tok.encode(text) == engine.tokenizer.encode(text)
    got = plain_transformers(out, questions, tmp_path)
    assert got["prompts"] == [engine.prompt_ids(q) for q in questions]
    assert got["answers"] == [engine.chat(q)[0] for q in questions]


def test_chatglm3_tool_prompt_matches_the_published_tokenizer(reference_dir, tmp_path):
    engine = load_base(task_config("--model.path", str(reference_dir / "chatglm3-6b-tiny")))
    golden = json.loads((reference_dir / "chatglm3-6b-tiny" / "tool_chat_golden.json").read_text("utf-8"))
    out = save_transformers(engine.model, engine.tokenizer, engine.template, tmp_path / "out", "chatglm3")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    messages = golden["history"][:3]
    ids = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=False)
    observation = tok.apply_chat_template(
        golden["history"], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert list(observation) == golden["observation_prompt_ids"]
    assert list(ids) == golden["observation_prompt_ids"][: len(ids)]


def test_chatglm6b_and_templates_without_a_chat_template_are_refused():
    with pytest.raises(ExportError, match="ChatGLM-6B has no transformers-native class"):
        check_exportable("chatglm", "chatglm")
    with pytest.raises(ExportError, match="template 'alpaca' has no chat_template"):
        check_exportable("chatglm2", "alpaca")
    assert issubclass(ExportError, MergeError.__mro__[1])  # a ConfigError: the script prints one error line


def test_merge_format_without_merge_is_refused(capsys):
    from infer_lora_finetuning import main

    assert main(["--merge_format", "transformers"]) == 1
    assert "error: --merge_format applies to --merge only" in capsys.readouterr().err
