"""train.compile (torch.compile'd transformer blocks) and train.checkpoint_layers (selective recomputation)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from glmtune.config import ConfigError
from glmtune.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration
from glmtune.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmtune.training.compile import compile_blocks, transformer_blocks
from glmtune.training.trainer import check_config, set_checkpoint_layers, train
from tests.training.conftest import make_cfg
from tests.training.training_helpers import LossProbe


def chatglm2(layers: int = 3, ffn: int = 96) -> ChatGLM2ForConditionalGeneration:
    torch.manual_seed(0)
    config = ChatGLM2Config(
        num_layers=layers,
        hidden_size=48,
        num_attention_heads=4,
        kv_channels=12,
        multi_query_attention=True,
        multi_query_group_num=2,
        ffn_hidden_size=ffn,
        padded_vocab_size=101,
    )
    return ChatGLM2ForConditionalGeneration(config)


def chatglm(layers: int = 3) -> ChatGLMForConditionalGeneration:
    torch.manual_seed(0)
    config = ChatGLMConfig(
        num_layers=layers, hidden_size=32, inner_hidden_size=64, num_attention_heads=4, vocab_size=150,
        bos_token_id=140, eos_token_id=141, mask_token_id=142, gmask_token_id=143,
    )  # fmt: skip
    return ChatGLMForConditionalGeneration(config)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def test_transformer_blocks_are_the_block_stacks():
    from peft import LoraConfig, get_peft_model

    v2, v1, other = chatglm2(), chatglm(), llama()
    assert transformer_blocks(v2) is v2.transformer.encoder.layers
    assert transformer_blocks(v1) is v1.transformer.layers
    assert transformer_blocks(other) is other.model.layers
    wrapped = get_peft_model(v2, LoraConfig(r=4, target_modules=["query_key_value"]))
    assert transformer_blocks(wrapped) is v2.transformer.encoder.layers
    with pytest.raises(ValueError, match="no stack of transformer blocks"):
        transformer_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def block_calls(model, stack, ids) -> list[int]:
    """How often each block starts in one training forward + backward (2 = recomputed in the backward; the
    recomputation stops early, once it has what the backward needs, so count starts)."""
    calls = [0] * len(stack)
    hooks = [
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(stack)
    ]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    return calls


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_checkpoint_layers_recomputes_only_the_first_blocks(family):
    model = chatglm() if family == "chatglm" else chatglm2()
    stack = transformer_blocks(model)
    ids = torch.randint(5, 100, (2, 9))
    if family == "chatglm":  # ChatGLM-6B needs its [gMASK] and bos in every sequence
        ids[:, -2:] = torch.tensor([model.config.gmask_token_id, model.config.bos_token_id])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert block_calls(model, stack, ids) == [2, 2, 2]
    set_checkpoint_layers(model, 1)
    assert block_calls(model, stack, ids) == [2, 1, 1]
    set_checkpoint_layers(model, 0)
    assert block_calls(model, stack, ids) == [1, 1, 1]


def lora_model(family: str, dtype=torch.float32, **shape):
    """A tiny ChatGLM with fused LoRA r=4 on the four block linears, lora_B non-zero (so lora_A learns)."""
    from glmtune.config import LoraArgs, TaskConfig
    from glmtune.training.methods import apply_method

    model = (chatglm(**shape) if family == "chatglm" else chatglm2(**shape)).to(dtype)
    model.glmtune_family = family
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    cfg = TaskConfig(method="lora", lora=LoraArgs(r=4, alpha=8, dropout=0.0, target_modules=targets))
    model = apply_method(model, cfg, total_steps=1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def lora_grads(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # as CausalLMModule calls it
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class ForwardGemms(TorchDispatchMode):
    """Counts, per weight, the matrix products that multiply by its transpose: the forward GEMMs of those
    linears (their backward multiplies by the weight itself)."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights
        self.counts = [0] * len(weights)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            other = args[-1]
            for i, weight in enumerate(self.weights):
                same = other.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
                if same and other.shape == weight.t().shape:
                    self.counts[i] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_blocks_skip_their_last_gemm(family, dtype):
    """A recomputed block with fused LoRA stops before its frozen `dense_4h_to_h` GEMM (whose output the
    backward does not need; a quarter of a ChatGLM2 block's forward), and the gradients are those of the run
    without recomputation."""
    model = lora_model(family, dtype)
    mlps = [block.mlp for block in transformer_blocks(model)]
    ups = [mlp.dense_h_to_4h.base_layer.weight for mlp in mlps]
    downs = [mlp.dense_4h_to_h.base_layer.weight for mlp in mlps]
    ids = torch.randint(5, 100, (2, 9))
    if family == "chatglm":
        ids[:, -2:] = torch.tensor([model.config.gmask_token_id, model.config.bos_token_id])
    model.train()

    def backward(checkpointing: bool):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        with ForwardGemms(ups + downs) as gemms:
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return gemms.counts, grads

    plain_counts, plain_grads = backward(checkpointing=False)
    counts, grads = backward(checkpointing=True)
    assert plain_counts == [0] * 6
    assert counts == [1, 1, 1] + [0, 0, 0]  # the blocks are recomputed, but not their last GEMM
    assert len(grads) == 3 * 8 and grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)


def graph_recorder():
    """A torch.compile backend that runs the graphs as traced (no code generation) and keeps them."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(graph_module, example_inputs):
            graphs[kind].append(graph_module)
            return graph_module.forward

        return compiler

    backend = aot_autograd(
        fw_compiler=keep("forward"),
        bw_compiler=keep("backward"),
        partition_fn=min_cut_rematerialization_partition,
    )
    return backend, graphs


def node_shapes(nodes) -> list[tuple[int, ...]]:
    return [tuple(n.meta["val"].shape) for n in nodes if isinstance(n, torch.fx.Node) and "val" in n.meta]


def test_compiled_recomputation_keeps_only_the_inputs_and_skips_the_last_gemm():
    """Under train.compile, a recomputed block and its checkpoint are one compiled graph: its forward keeps
    no activation (the block's inputs only), and its backward recomputes the block but for the last GEMM.
    Checkpointing a compiled block from outside would keep the activations in the compiled forward's
    outputs (dropped and recomputed by rerunning all of it)."""
    model = lora_model("chatglm2", ffn=80)  # no other GEMM of the step has the shape of dense_4h_to_h's
    batch, seq = 3, 13
    ids = torch.randint(5, 100, (batch, seq))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    eager = lora_grads(model, ids)
    backend, graphs = graph_recorder()
    try:
        compile_blocks(model, backend=backend)
        grads = lora_grads(model, ids)
    finally:
        torch._dynamo.reset()
    for name, grad in eager.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    mlp = transformer_blocks(model)[0].mlp
    hidden, ffn = mlp.dense_4h_to_h.base_layer.weight.shape
    width = mlp.dense_h_to_4h.base_layer.weight.shape[0]  # 2 x ffn: gate and up
    tokens = batch * seq
    assert graphs["forward"] and graphs["backward"]
    for graph in graphs["forward"]:
        (outputs,) = [n.args[0] for n in graph.graph.nodes if n.op == "output"]
        kept = [s for s in node_shapes(outputs) if s[0] == tokens or s[:2] == (batch, seq)]
        assert kept and all(s[-1] in (hidden, 2) for s in kept), kept  # hidden states and the rotary table
    gemms = [
        tuple(node_shapes(n.args[-2:]))
        for graph in graphs["backward"]
        for n in graph.graph.nodes
        if n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    ]
    assert ((tokens, hidden), (hidden, width)) in gemms  # the recomputed dense_h_to_4h
    assert ((tokens, ffn), (ffn, hidden)) not in gemms  # no recomputed dense_4h_to_h


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_do_not_break_on_a_dynamic_sequence_length(checkpointing):
    """A second sequence length makes it symbolic; the blocks must stay whole graphs (SDPA's is_causal once
    broke them in two)."""
    from torch._dynamo.utils import counters

    model = lora_model("chatglm2", layers=5)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backend, graphs = graph_recorder()
    torch._dynamo.reset()
    counters.clear()
    try:
        compile_blocks(model, backend=backend)
        for seq in (9, 12, 15):
            lora_grads(model, torch.randint(5, 100, (2, seq)))
        breaks = dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    # Per shape kind (the static first, then the dynamic one), a graph for the first block, whose input needs
    # no gradient, and one for the others; not one per block.
    assert len(graphs["forward"]) <= 4
    assert breaks == {}


def test_training_steps_build_no_key_value_cache():
    from glmtune.config import TrainArgs
    from glmtune.training.module import CausalLMModule

    model = chatglm2()
    assert model.config.use_cache  # what generation wants by default
    caches = []
    model.register_forward_hook(lambda m, args, out: caches.append(out.past_key_values), with_kwargs=False)
    module = CausalLMModule(model, TrainArgs(), total_steps=1)
    ids = torch.randint(5, 100, (2, 7))
    module.model_step({"input_ids": ids, "labels": ids}).backward()
    assert caches == [None]


def test_checkpoint_layers_is_refused_where_it_cannot_apply(tiny_chatglm2, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="has no selective checkpointing"):
        set_checkpoint_layers(llama(), 1)
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", checkpoint_layers=1)
    with pytest.raises(ConfigError, match="needs train.gradient_checkpointing"):
        check_config(cfg)
    cfg = make_cfg(
        tiny_chatglm2,
        tiny_data,
        tmp_path / "run",
        checkpoint_layers=1,
        gradient_checkpointing=True,
        strategy="fsdp",
    )
    with pytest.raises(ConfigError, match="not supported with train.strategy=fsdp"):
        check_config(cfg)
    with pytest.raises(ConfigError, match="checkpoint_layers must be >= 0"):
        make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", checkpoint_layers=-1)


def test_compile_is_refused_with_sharding_strategies(tiny_chatglm2, tiny_data, tmp_path):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", compile=True, strategy="deepspeed_stage_2")
    with pytest.raises(ConfigError, match="train.compile is not supported with train.strategy=deepspeed"):
        check_config(cfg)
    with pytest.raises(ValueError, match="unknown compile mode"):
        compile_blocks(chatglm2(), "fastest")


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_blocks(tiny_chatglm2, tiny_data, tmp_path):
    """Same seed, same data: the compiled run's losses and saved adapter match the eager run's (fp32, so only
    the compiler's reordering of sums differs), and the artifact has the same names."""
    import lightning as L

    class BlocksCompiled(L.Callback):
        def on_train_start(self, trainer, module):
            self.compiled = [b._compiled_call_impl is not None for b in transformer_blocks(module.model)]

    runs = {}
    for compiled in (False, True):
        probe, check = LossProbe(), BlocksCompiled()
        cfg = make_cfg(
            tiny_chatglm2,
            tiny_data,
            tmp_path / f"run-{compiled}",
            max_epochs=1,
            compile=compiled,
            gradient_checkpointing=True,
            checkpoint_layers=1,
        )
        cfg.data.eval_files = []
        result = train(cfg, callbacks=[probe, check], enable_progress_bar=False)
        weights = load_file(result.artifact_dir / "adapter_model.safetensors")
        runs[compiled] = (probe.step_losses, weights, check.compiled)
    (eager_losses, eager_weights, eager_flags), (losses, weights, flags) = runs[False], runs[True]
    assert flags == [True, True] and eager_flags == [False, False]
    assert len(losses) == len(eager_losses) >= 5
    for key, loss in eager_losses.items():
        assert losses[key] == pytest.approx(loss, rel=1e-4, abs=1e-5), key
    assert losses[max(losses)] < losses[min(losses)]  # and it learns
    assert set(weights) == set(eager_weights)
    for name, tensor in eager_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-3, atol=1e-5, msg=name)
