"""The LightningModule hosting a backbone with its tuning method.

Train, validation and test all go through `model_step`: one model call (every batch key but the labels, no
key/value cache), which returns the hidden states, and then `loss(batch, outputs)`, the one method a subclass
overrides (the task's `models.py` is the place). The default loss is the next-token cross entropy, scored from
the last hidden state through the output layer chunk by chunk (glmtune.models.losses). The call itself cannot
be overridden, so the scripts, `Tuner` and the benchmarks all train the same path. Everything else here is the
machinery every method shares: the non-finite loss guard, AdaLoRA's regulariser and budget updates, optimizer
and schedule, per-step seeding (exact resume) and checkpoints that hold only what trains.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn
from transformers import get_scheduler

from glmtune.config import ConfigError, TrainArgs
from glmtune.models.losses import chunked_causal_lm_loss
from glmtune.training.bnb import require_bitsandbytes
from glmtune.training.distributed import is_mixed

# Tokens the default loss scores at a time. A chunk's fp32 logits and their gradient are its peak extra
# memory: ~0.6 GiB at a 65k vocabulary; the chunk's GEMM is still large.
LOSS_CHUNK_TOKENS = 1024

# Wrapper prefixes that FSDP / activation checkpointing insert into parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/Inf for `train.max_bad_steps` micro-batches in a row."""


def clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """A seed that depends only on where the run is, so a resumed run draws the same dropout masks."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{batch_idx}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class CausalLMModule(L.LightningModule):
    # False: the model computes logits for the last position only (transformers' logits_to_keep=1) and the loss
    # reads the hidden states. A `loss` that reads outputs.logits sets it to True: the model then returns the
    # logits of every position (more memory).
    uses_logits: bool = False
    # What the loss trains (config key `stage`); a checkpoint of one stage does not resume another.
    stage: str = "sft"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "model_step" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} overrides model_step: override loss(batch, outputs) instead, so the model "
                "is called as in every other run (every batch key but the labels, use_cache=False)"
            )

    def __init__(self, model: nn.Module, train_args: TrainArgs, total_steps: int, method: str = "lora"):
        super().__init__()
        self.model = model
        self.args = train_args
        self.total_steps = total_steps
        self.method = method
        self.bad_steps_in_a_row = 0
        self.bad_steps_total = 0
        self._step_was_bad = False
        self._good_micro_batches = 0
        self._head_checked = False
        # Checkpoints hold only the trained tensors; the frozen rest comes from the base model (DeepSpeed too).
        self.strict_loading = False

    # ---------------------------------------------------------------- steps

    def model_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Every key of the batch but the labels reaches the model: packed batches carry seq_ids and position_ids
        # beside input_ids and attention_mask. The labels are the loss's to read; given to the model, it would
        # score them against the logits it was asked not to compute. No key/value cache: a loss needs none, and
        # under train.compile a cache object passed to every block would make each block's graph specialise on
        # its cache layer and recompile, block after block.
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        outputs = self.model(
            **inputs, use_cache=False, output_hidden_states=True, logits_to_keep=0 if self.uses_logits else 1
        )
        if not self.uses_logits and not self._head_checked:
            check_logits_come_from_head(self.model, outputs)
            self._head_checked = True
        return self.loss(batch, outputs)

    def loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        """The loss to minimise from the model's `outputs` on `batch`. Default: the mean next-token cross
        entropy over labels != -100, from the last hidden state through the output layer, a chunk of tokens at
        a time, so that the fp32 logits over the whole vocabulary never exist at once."""
        head = self.model.get_output_embeddings()
        return chunked_causal_lm_loss(outputs.hidden_states[-1], head, batch["labels"], LOSS_CHUNK_TOKENS)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout (LoRA, prefix, attention) draws from a generator reseeded per micro-batch and per rank:
        # a resumed run reproduces the masks of an uninterrupted one, and ranks do not share masks.
        torch.manual_seed(step_seed(self.args.seed, self.current_epoch, batch_idx, self.global_rank))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss = self.model_step(batch)
        if self.method == "adalora":
            loss = loss + adalora_orthogonality_penalty(self.model)
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self.trainer.world_size > 1:
            # Every rank must skip together, or the others would wait forever in the gradient all-reduce.
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self.bad_steps_in_a_row += 1
            self.bad_steps_total += 1
            self.log("train/skipped_steps", float(self.bad_steps_total), rank_zero_only=True)
            if self.bad_steps_in_a_row >= self.args.max_bad_steps:
                raise NonFiniteLossError(
                    f"the loss was {loss.detach().float().item()} on {self.bad_steps_in_a_row} micro-batches in "
                    f"a row (train.max_bad_steps={self.args.max_bad_steps}, optimizer step {self.global_step}, "
                    f"{self.bad_steps_total} skipped in all): lower train.learning_rate, use precision "
                    "bf16-mixed instead of 16-mixed, or check the data"
                )
            return self._skipped_loss()
        self.bad_steps_in_a_row = 0
        self._good_micro_batches += 1
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _skipped_loss(self) -> torch.Tensor | None:
        """What a skipped micro-batch returns: it must add nothing to the gradients.

        One process: None, Lightning's own skip (no backward). Lightning refuses None under DDP / DeepSpeed,
        whose backward is a collective every rank must join: there, a zero loss wired to every trained weight
        gives exactly zero gradients, without any NaN of the real loss reaching them.
        """
        if self.trainer.world_size == 1 and not isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return None
        return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # An optimizer step whose micro-batches were all skipped must not move the weights: Adam would still
        # step on zero gradients through its momentum. Without gradients the optimizer leaves a weight alone
        # (a GradScaler has already checked them for inf by now). DeepSpeed keeps gradients to itself: there
        # a fully skipped step is taken with zero gradients.
        good, self._good_micro_batches = self._good_micro_batches, 0
        self._step_was_bad = good == 0
        if self._step_was_bad:
            for p in self.model.parameters():
                p.grad = None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # The language-model loss alone (no AdaLoRA regulariser): comparable with the other methods and with
        # the reloaded adapter.
        loss = self.model_step(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model_step(batch)
        self.log("test_loss", loss, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # AdaLoRA scores importance from the gradients of the step just taken (zeroed only before the next
        # backward) and masks singular values to that step's budget: right after the step, before any callback
        # (a checkpoint) sees the weights. Called once per optimizer step, whatever the accumulation; the global
        # step already counts this one, PEFT counts from 0.
        if self.method == "adalora" and not self._step_was_bad:
            self.model.base_model.update_and_allocate(self.global_step - 1)

    # ---------------------------------------------------------------- optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters: check `method` and its settings")
        optimizer = build_optimizer(named, self.args, offload=_deepspeed_offloads_optimizer(self.trainer))
        scheduler = build_scheduler(optimizer, self.args, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints

    def trainable_names(self) -> set[str]:
        return {clean_name(n) for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" in checkpoint:  # DeepSpeed keeps the weights in its own files
            trainable = self.trainable_names()
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if clean_name(k) in trainable
            }
        extra: dict[str, Any] = {
            "method": self.method,
            "stage": self.stage,
            "bad_steps_total": self.bad_steps_total,
        }
        if self.method == "adalora":
            extra["adalora"] = _adalora_state(self.model)
        checkpoint["glmtune"] = extra

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("glmtune", {})
        if extra.get("method", self.method) != self.method:
            raise ConfigError(
                f"train.resume: the checkpoint was trained with method {extra['method']!r}, this run uses "
                f"{self.method!r}"
            )
        if extra.get("stage", "sft") != self.stage:
            raise ConfigError(
                f"train.resume: the checkpoint was trained with stage {extra.get('stage', 'sft')!r}, this run uses "
                f"{self.stage!r}"
            )
        self.bad_steps_total = int(extra.get("bad_steps_total", 0))
        if self.method == "adalora" and "adalora" in extra:
            _load_adalora_state(self.model, extra["adalora"])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if result.unexpected_keys:
            raise KeyError(f"checkpoint holds tensors this model lacks: {list(result.unexpected_keys)[:3]}")
        missing_trained = sorted(self.trainable_names() & {clean_name(k) for k in result.missing_keys})
        if missing_trained and state_dict:
            raise KeyError(f"checkpoint lacks trained tensors of this model: {missing_trained[:3]}")
        return result


def check_logits_come_from_head(model: nn.Module, outputs: Any) -> None:
    """Refuse a model whose logits are more than its output layer applied to its last hidden state (soft-capped
    or scaled, as some transformers models compute them): a loss scoring the hidden states through the output
    layer would train it on the wrong logits. Checked on the last position, the only one computed."""
    head = model.get_output_embeddings()
    name = type(model).__name__
    if head is None:
        raise ConfigError(
            f"{name} has no output layer (get_output_embeddings() is None): set uses_logits = True in models.py "
            "and compute the loss from outputs.logits"
        )
    with torch.no_grad():
        expected = head(outputs.hidden_states[-1][:, -1:]).float()
    if not torch.allclose(outputs.logits[:, -1:].float(), expected, rtol=1e-3, atol=1e-3):
        raise ConfigError(
            f"{name}'s logits are not its output layer applied to its last hidden state (soft-capped or scaled "
            "logits?), which the default loss reads: set uses_logits = True in models.py and compute the loss "
            "from outputs.logits (models.py's docstring shows how)"
        )


def adalora_orthogonality_penalty(model: nn.Module) -> torch.Tensor | float:
    """AdaLoRA's regulariser of the training loss: `orth_reg_weight` times the mean, over the adapter's A and B
    matrices, of ||A A^T - I|| and ||B^T B - I|| (Frobenius), which keeps them near the orthogonal factors of
    the SVD that AdaLoRA's rank budget prunes.

    PEFT adds it inside AdaLoraModel.forward, to a loss the model computed from labels; the model here returns
    hidden states and the loss is the module's, so it is added here, computed as PEFT computes it.
    """
    from peft.utils.integrations import gather_params_ctx

    adapter = model.base_model.trainable_adapter_name
    weight = model.peft_config[adapter].orth_reg_weight
    if weight < 0:
        raise ValueError("adalora.orth_reg_weight must be >= 0")
    total: torch.Tensor | float = 0
    count = 0
    for name, p in model.base_model.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            if p.shape == torch.Size([0]):  # a ZeRO-3 shard: gathered for the product
                with gather_params_ctx(p, fwd_module=model.base_model):
                    covariance = p @ p.T if "lora_A" in name else p.T @ p
            else:
                covariance = p @ p.T if "lora_A" in name else p.T @ p
            identity = torch.eye(*covariance.size(), out=torch.empty_like(covariance))
            identity.requires_grad = False
            count += 1
            total += torch.norm(covariance - identity, p="fro")
    return weight * (total / count) if count else 0.0


def _adalora_state(model: nn.Module) -> dict[str, Any]:
    """The rank allocator's running importance scores and the budget so far (not parameters, so not saved)."""
    allocator = model.base_model.rankallocator
    config = model.peft_config[model.base_model.trainable_adapter_name]
    return {
        "ipt": allocator.ipt,
        "exp_avg_ipt": allocator.exp_avg_ipt,
        "exp_avg_unc": allocator.exp_avg_unc,
        "rank_pattern": config.rank_pattern,
    }


def _load_adalora_state(model: nn.Module, state: dict[str, Any]) -> None:
    allocator = model.base_model.rankallocator
    device = next(model.parameters()).device
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(allocator, key, {n: t.to(device) for n, t in state[key].items()})
    model.peft_config[model.base_model.trainable_adapter_name].rank_pattern = state["rank_pattern"]


def _deepspeed_offloads_optimizer(trainer: L.Trainer | None) -> bool:
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, DeepSpeedStrategy):
        return False
    offload = strategy.config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def check_optimizer(args: TrainArgs) -> None:
    """Fail before loading anything when the optimizer cannot run here."""
    if args.optimizer == "lion":
        try:
            import lion_pytorch  # noqa: F401
        except ImportError:
            raise ConfigError(
                "train.optimizer=lion needs lion-pytorch: pip install 'glmtune[lion]'"
            ) from None
    elif args.optimizer == "adamw8bit":
        require_bitsandbytes("train.optimizer=adamw8bit")


def build_optimizer(
    named_params: list[tuple[str, nn.Parameter]], args: TrainArgs, offload: bool = False
) -> torch.optim.Optimizer:
    """AdamW / Lion / 8-bit AdamW; weight decay only on matrices (not on biases, norms or LoRA's E vectors)."""
    check_optimizer(args)
    decay = [p for _, p in named_params if p.ndim >= 2]
    no_decay = [p for _, p in named_params if p.ndim < 2]
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    lr = args.learning_rate
    if args.optimizer == "adamw":
        if offload:
            # ZeRO-Offload steps the optimizer on the CPU; DeepSpeed's vectorised Adam is the one it supports.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=lr, adamw_mode=True)
        # The fused kernel updates every tensor in one launch (CUDA's foreach default: several per group; the
        # CPU's: a loop over the tensors), which matters for LoRA's hundreds of small tensors. It unscales
        # gradients inside its step, so Lightning refuses to clip them under mixed precision: not there.
        fused = all(p.device.type in ("cuda", "cpu") for _, p in named_params) and not (
            is_mixed(args.precision) and args.gradient_clip_val > 0
        )
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    if args.optimizer == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=lr)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, lr=lr)


SCHEDULER_NAMES = {
    "constant": "constant_with_warmup",
    "linear": "linear",
    "cosine": "cosine",
    "cosine_restarts": "cosine_with_restarts",
}


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, total_steps: int):
    """transformers' warmup schedules, stepped once per optimizer step over the run's real step count."""
    extra = {"num_cycles": args.num_cycles} if args.scheduler == "cosine_restarts" else None
    return get_scheduler(
        SCHEDULER_NAMES[args.scheduler],
        optimizer,
        num_warmup_steps=args.warmup_steps,
        num_training_steps=max(1, total_steps),
        scheduler_specific_kwargs=extra,
    )


def steps_per_epoch(num_samples: int, batch_size: int, accumulate: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch: Lightning also steps on the epoch's last, incomplete accumulation."""
    batches = math.ceil(num_samples / world_size)
    batches = math.ceil(batches / batch_size)
    return max(1, math.ceil(batches / accumulate))
