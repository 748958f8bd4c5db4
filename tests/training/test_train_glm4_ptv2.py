"""P-Tuning v2 on GLM-4-9B-Chat (glm-4-9b-chat-tiny): the prefix holds keys and values per key/value group of
its multi-query attention, trains, saves as the published prefix file, and reloads to chat (infer_finetuning.py
path, with the KV cache)."""

from __future__ import annotations

import torch

from glmtune.inference.artifacts import load_finetuned
from glmtune.models.loading import load_model
from tests.training.conftest import make_cfg
from tests.training.test_train_methods import run_and_check

FOLDER = "glm-4-9b-chat-tiny"
PRE_SEQ_LEN = 4


def greedy_without_cache(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """Greedy ids by full forward passes (no KV cache): what generate() with the cache must reproduce."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_glm4_ptv2_trains_saves_and_reloads_to_chat(reference_dir, tiny_data, tmp_path) -> None:
    folder = reference_dir / FOLDER
    # A prefix reaches the logits only through attention over random weights: a large step moves it.
    cfg = make_cfg(folder, tiny_data, tmp_path / "run", "ptv2", max_epochs=2, learning_rate=0.2)
    cfg.ptv2.pre_seq_len = PRE_SEQ_LEN
    _, result = run_and_check(cfg, min_drop=0.05)  # the loss drops, the saved prefix reloads to the same loss

    # The published file: only the prefix encoder, fp32, one key and one value per layer and kv group
    # (GLM-4: 2 groups of 16 channels here), not per attention head.
    config = load_model(folder).config
    assert config.multi_query_attention and config.multi_query_group_num < config.num_attention_heads
    state = torch.load(result.artifact_dir / "pytorch_model.bin", weights_only=True)
    width = config.num_layers * 2 * config.multi_query_group_num * config.kv_channels
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "transformer.prefix_encoder.embedding.weight": (PRE_SEQ_LEN, width)
    }
    assert all(v.dtype == torch.float32 for v in state.values())

    engine = load_finetuned(cfg, result.artifact_dir)
    model = engine.model
    assert model.glmtune_family == "glm4" and engine.template.name == "glm4"
    loaded = model.transformer.prefix_encoder.embedding.weight
    assert torch.equal(loaded, state["transformer.prefix_encoder.embedding.weight"])

    prompt = engine.template.build_chat_prompt("你好").input_ids
    # No stop ids: the tuned prefix may well answer <|user|> (the end of every trained answer) at once.
    with torch.no_grad():
        cached = model.generate(torch.tensor([prompt]), eos_token_id=[], max_new_tokens=5, do_sample=False)
    cached = cached[0, len(prompt) :]
    # generate() puts the prefix before the cache at every step, as the full forward puts it before the ids
    assert cached.tolist() == greedy_without_cache(model, prompt, 5)
    done = engine.complete("你好", max_new_tokens=5)
    stops = set(engine.template.stop_token_ids)
    answer = next((cached[:i] for i, t in enumerate(cached.tolist()) if t in stops), cached)
    assert done.text == engine.tokenizer.decode(answer.tolist(), skip_special_tokens=True).strip()

    # The prefix is what the model answers with: the base model's next-token logits differ.
    base = load_model(folder, torch_dtype="float32")
    with torch.no_grad():
        with_prefix = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        without = base(input_ids=torch.tensor([prompt])).logits[0, -1]
    assert (with_prefix - without).abs().max().item() > 1e-3
