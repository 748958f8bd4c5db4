"""The task config: one YAML file (or command-line flags) describing what a run does.

Every script parses the same sections, so one YAML drives data building, training and chat. The
dataclasses below are the schema: jsonargparse turns each field into a `--section.key` flag, shows its
docstring in `--help`, and refuses unknown keys. Model *shape* lives in the checkpoint's config.json;
this file only says what to do with it.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # jsonargparse is imported where parsing happens, so the dataclasses import anywhere
    from jsonargparse import ArgumentParser, Namespace

# The embedded default ships inside the package (so an installed glmtune runs it from any folder): its
# config, and the data its paths name, which `resolve_path` finds when the current folder has no such file.
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEFAULT_CONFIG = DEMO_DIR / "default.yaml"
# The one folder where the embedded tiny model is built on first use: a `model.path` anywhere else must
# already hold a checkpoint, so a typo is an error rather than a freshly built random model.
TINY_MODEL_PATH = "output/tiny-chatglm2"

Family = Literal["auto", "chatglm", "chatglm2", "chatglm3", "glm4", "hf"]
Method = Literal["full", "freeze", "ptv2", "lora", "adalora", "ia3"]
# sft: supervised fine-tuning on answers; dpo: Direct Preference Optimization on chosen / rejected pairs;
# reward: a pairwise reward model (a value head on the last token) on the same pairs.
Stage = Literal["sft", "dpo", "reward"]


class ConfigError(ValueError):
    """A config value that cannot work (missing file, impossible combination)."""


@dataclass
class TinyModelArgs:
    """Shape of the embedded tiny ChatGLM2 built when `model.path` holds no checkpoint yet.

    Args:
        num_layers: transformer blocks.
        hidden_size: model width (<= 256 keeps the CPU demo fast).
        num_attention_heads: query heads.
        multi_query_group_num: key/value heads (multi-query attention groups).
        kv_channels: width of one head.
        ffn_hidden_size: SwiGLU inner width.
        vocab_size: SentencePiece pieces to train on `texts` (byte fallback covers the rest).
        texts: paragraph-format data files whose questions and answers train the tokenizer.
        seed: seed of the deterministic weight initialisation.
    """

    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    multi_query_group_num: int = 2
    kv_channels: int = 32
    ffn_hidden_size: int = 352
    vocab_size: int = 1000
    texts: list[str] = field(default_factory=lambda: ["data/train.json"])
    seed: int = 0


@dataclass
class ModelArgs:
    """The model to tune.

    Args:
        path: checkpoint folder (published ChatGLM layout, or any transformers causal LM folder).
        family: "auto" detects ChatGLM-6B / ChatGLM2 / ChatGLM3 / GLM-4 (glm4) / other from the folder.
        dtype: weights' dtype once loaded ("auto" keeps the checkpoint's).
        quantization_bit: 0, or 8 / 4 for ChatGLM int8 / int4 weights (published format).
        quantization: bitsandbytes quantization of the block linears at load, CUDA only: none, bnb8
            (LLM.int8) or nf4 (4-bit NormalFloat, QLoRA); the LoRA adapters stay in float.
        tiny: when set and `path` is the default folder (output/tiny-chatglm2) without a checkpoint yet,
            build the tiny ChatGLM2 there first; any other `path` must already hold a checkpoint.
        trust_remote_code: let transformers run the Python code shipped in the checkpoint folder (needed by
            models such as Baichuan whose architecture transformers does not have). Off by default: that code
            runs with your permissions, so turn it on only for folders you trust. ChatGLM checkpoints never
            need it (glmtune carries its own implementations).
    """

    path: str = TINY_MODEL_PATH
    family: Family = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32"
    quantization_bit: Literal[0, 4, 8] = 0
    quantization: Literal["none", "bnb8", "nf4"] = "none"
    tiny: TinyModelArgs | None = None
    trust_remote_code: bool = False


@dataclass
class DataArgs:
    """Training data and how it becomes records.

    Templates: "auto" picks the model family's chat format: chatglm (ChatGLM-6B), chatglm2, or chatglm3 for
    ChatGLM3 (role tokens `<|user|>` / `<|assistant|>`, exactly what its chat() builds, so the model is
    trained on the prompts it will be chatted with). "chatglm3_plain" instead reproduces the plain samples of
    the reference fine-tuning data (`[gMASK] sop` + query + response + eos, no role tokens); a model tuned
    with it must be prompted with it too. glm4 (auto for GLM-4) labels answers as the published GLM-4
    fine-tuning demo does with `combine: true`; glm4_per_message as with `combine: false` (the newline after
    `<|assistant|>` is learnt too). llama2, chatml and alpaca are for other models.

    Args:
        train_files: JSON / JSON-lines files to train on.
        eval_files: files to evaluate on (may be empty).
        format: "auto" (detected per file), paragraph, prompt_completion, alpaca, conversations, input_target.
        template: prompt template: auto, chatglm, chatglm2, chatglm3, chatglm3_plain, glm4, glm4_per_message,
            llama2, chatml, alpaca.
        max_seq_length: longest sample in tokens (prompt + answer).
        max_target_length: longest answer in tokens (None = no separate limit).
        strategy: what to do with longer samples: truncate, slide (windows of `stride`) or drop.
        stride: step of the sliding window (None = half of max_seq_length).
        ensure_answer_min_length: truncation keeps at least this many answer tokens (None = half the window).
        truncate_side: which end of a too long prompt truncation cuts: prompt_head (the oldest context, the
            default) or prompt_tail (the text next to the answer); `[gMASK] sop` / bos are always kept.
        multi_turn: per_turn (one sample per turn, earlier turns as context) or dialogue (one sample per
            dialogue: the last turn's chat prompt plus its answer, every answer supervised). ChatGLM-6B
            (template chatglm) only has per_turn: its prompt is read bidirectionally, so answers inside it
            cannot be targets.
        packing: pack several samples per sequence (attention never crosses samples).
        backend: record (indexed binary file, memory mapped) or lmdb (for data larger than memory).
        num_workers: tokenizer processes.
        shuffle: shuffle the training records (stored order, and each epoch's loader order; false keeps
            the records in data-file order).
        seed: seed of the shuffle and of the eval_ratio split.
        eval_ratio: share of the training dialogues set aside as eval records (0 = none); needs eval_files
            empty.
        on_error: raise (stop at the first bad line) or skip (count and save bad lines to rejects.jsonl).
        output_dir: where records are written.
    """

    train_files: list[str] = field(default_factory=lambda: ["data/train.json"])
    eval_files: list[str] = field(default_factory=list)
    format: str = "auto"
    template: str = "auto"
    max_seq_length: int = 256
    max_target_length: int | None = None
    strategy: Literal["truncate", "slide", "drop"] = "truncate"
    stride: int | None = None
    ensure_answer_min_length: int | None = None
    truncate_side: Literal["prompt_head", "prompt_tail"] = "prompt_head"
    multi_turn: Literal["per_turn", "dialogue"] = "per_turn"
    packing: bool = False
    backend: Literal["record", "lmdb"] = "record"
    num_workers: int = 1
    shuffle: bool = True
    seed: int = 42
    eval_ratio: float = 0.0
    on_error: Literal["raise", "skip"] = "raise"
    output_dir: str = "output/records"

    # The values are checked where they become the build's settings (glmtune.data.prepare.build_settings).


@dataclass
class LoraArgs:
    """LoRA / DoRA / rsLoRA (PEFT) settings; also the starting point of AdaLoRA and IA3's targets.

    Args:
        r: rank.
        alpha: scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).
        dropout: dropout on the LoRA input.
        target_modules: layer names to adapt; None = the family's default (ChatGLM: query_key_value, dense,
            dense_h_to_4h, dense_4h_to_h; other models: every linear layer but the output head).
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. output_layer).
        use_dora: weight-decomposed LoRA (DoRA); needs float base weights.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class AdaLoraArgs:
    """AdaLoRA rank-budget schedule (fractions of the real number of optimizer steps of the run).

    Args:
        init_r: starting rank of every matrix.
        target_r: average rank at the end.
        tinit_ratio: warm-up share of steps before pruning starts.
        tfinal_ratio: share of steps at the end with a fixed budget.
        delta_t: optimizer steps between budget allocations.
        beta1: EMA factor of the importance scores.
        beta2: EMA factor of their uncertainty.
        orth_reg_weight: weight of the orthogonality regulariser added to the loss.
    """

    init_r: int = 12
    target_r: int = 4
    tinit_ratio: float = 0.1
    tfinal_ratio: float = 0.2
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.target_r <= self.init_r:
            raise ConfigError(f"adalora: need 0 < target_r <= init_r, got {self.target_r} and {self.init_r}")
        if self.tinit_ratio < 0 or self.tfinal_ratio < 0 or self.tinit_ratio + self.tfinal_ratio >= 1:
            raise ConfigError(
                "adalora.tinit_ratio and adalora.tfinal_ratio must be >= 0 and sum to less than 1, got "
                f"{self.tinit_ratio} and {self.tfinal_ratio}"
            )
        if self.delta_t < 1:
            raise ConfigError(f"adalora.delta_t must be >= 1, got {self.delta_t}")


@dataclass
class PtuningArgs:
    """P-Tuning v2 prefix settings (the prefix encoder is trained in fp32 whatever the model's dtype).

    Args:
        pre_seq_len: prefix length (virtual tokens per layer).
        prefix_projection: encode the prefix through a two-layer MLP.
    """

    pre_seq_len: int = 16
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        if self.pre_seq_len < 1:
            raise ConfigError(f"ptv2.pre_seq_len must be >= 1, got {self.pre_seq_len}")


@dataclass
class FreezeArgs:
    """`freeze` method: which blocks train (the embeddings never do; the final norm and head with train_head).

    Args:
        num_frozen_layers: freeze the embeddings and the first N blocks, train the rest.
        num_trainable_layers: if set, train only the last N blocks instead (overrides num_frozen_layers).
        train_head: also train the final norm and the output layer.
    """

    num_frozen_layers: int = 0
    num_trainable_layers: int | None = None
    train_head: bool = False

    def __post_init__(self) -> None:
        if self.num_frozen_layers < 0:
            raise ConfigError(f"freeze.num_frozen_layers must be >= 0, got {self.num_frozen_layers}")
        if self.num_trainable_layers is not None and self.num_trainable_layers < 1:
            raise ConfigError(f"freeze.num_trainable_layers must be >= 1, got {self.num_trainable_layers}")


@dataclass
class DpoArgs:
    """Direct Preference Optimization (`stage: dpo`): the policy learns to prefer each pair's chosen answer over
    its rejected one, against a reference (the base model: the same model with its adapter disabled).

    Args:
        beta: strength of the pull towards the reference (TRL's beta; larger = stay closer to it).
        label_smoothing: assumed share of pairs whose labels are flipped (conservative DPO; sigmoid loss only).
        loss: sigmoid (the DPO paper's -log sigmoid(beta * margin)) or ipo ((margin - 1 / (2 beta))^2).
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss: Literal["sigmoid", "ipo"] = "sigmoid"

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError(
                "dpo.label_smoothing applies to the sigmoid loss only; set it to 0 with loss ipo"
            )


PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


@dataclass
class TrainArgs:
    """The Lightning trainer and optimizer.

    Args:
        output_dir: where checkpoints (checkpoints/), logs (logs/, tensorboard/) and the final artifact (final/,
            and best/ when there is eval data) go.
        max_epochs: passes over the training records.
        max_steps: stop after this many optimizer steps (-1 = use max_epochs).
        batch_size: samples per device per micro-batch.
        eval_batch_size: samples per batch in evaluation.
        learning_rate: peak learning rate.
        weight_decay: AdamW/Lion weight decay.
        optimizer: adamw, lion (pip install glmtune[lion]) or adamw8bit (bitsandbytes, CUDA).
        scheduler: constant, linear, cosine or cosine_restarts (all after a linear warmup).
        warmup_steps: linear warmup steps.
        num_cycles: cosine_restarts: number of hard restarts.
        accumulate_grad_batches: micro-batches per optimizer step.
        gradient_clip_val: clip the gradient norm (0 = off).
        precision: 32, 16-mixed, bf16-mixed, 16-true or bf16-true. With a *-true precision the frozen weights
            are cast to half, while LoRA / AdaLoRA / IA3 / P-Tuning v2 weights stay in fp32.
        accelerator: auto, cpu, gpu.
        devices: devices per node ("auto", a count, or a list).
        strategy: auto, ddp, fsdp, deepspeed_stage_2, deepspeed_stage_2_offload, deepspeed_stage_3,
            deepspeed_stage_3_offload, or a DeepSpeed JSON file (the presets are glmtune/training/deepspeed/*.json).
        num_nodes: machines (MASTER_ADDR / MASTER_PORT / NODE_RANK from the environment).
        gradient_checkpointing: recompute activations in the backward pass.
        checkpoint_layers: with gradient_checkpointing, recompute only the first N transformer blocks (null:
            all). The others keep their activations: faster steps for more memory (ChatGLM models; not with
            FSDP, which checkpoints every block itself).
        compile: torch.compile each transformer block (fuses norms, rotary, SwiGLU and LoRA's elementwise work;
            fewer kernel launches). The first steps of each new sequence length compile. Not with DeepSpeed or
            FSDP.
        compile_mode: torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune or
            max-autotune-no-cudagraphs.
        seed: global seed (data order, initialisation, dropout).
        log_every_n_steps: logging interval in optimizer steps.
        eval_every_n_steps: also evaluate every N optimizer steps (0 = at the end of each epoch only).
        eval_generate: at each evaluation also answer the first N eval turns (greedy, `generation.*`) and log
            exact match, ROUGE-1/2/L and BLEU-4 (0 = loss only).
        save_every_n_steps: also keep a checkpoint every N optimizer steps (0 = off).
        max_bad_steps: stop after this many non-finite losses in a row (each one is skipped).
        resume: checkpoint to resume from ("last" = the newest complete checkpoint in output_dir/checkpoints).
        dataloader_workers: DataLoader worker processes.
    """

    output_dir: str = "output/run"
    max_epochs: int = 3
    max_steps: int = -1
    batch_size: int = 8
    eval_batch_size: int = 8
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "lion", "adamw8bit"] = "adamw"
    scheduler: Literal["constant", "linear", "cosine", "cosine_restarts"] = "linear"
    warmup_steps: int = 0
    num_cycles: int = 2
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    precision: str = "32"
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    gradient_checkpointing: bool = False
    checkpoint_layers: int | None = None
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "default"
    )
    seed: int = 42
    log_every_n_steps: int = 5
    eval_every_n_steps: int = 0
    eval_generate: int = 0
    save_every_n_steps: int = 0
    max_bad_steps: int = 10
    resume: str | None = None
    dataloader_workers: int = 0

    def __post_init__(self) -> None:
        self.precision = str(self.precision)
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"train.precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}"
            )
        for key in ("batch_size", "eval_batch_size", "accumulate_grad_batches", "max_bad_steps", "num_nodes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in (
            "warmup_steps",
            "eval_every_n_steps",
            "eval_generate",
            "save_every_n_steps",
            "dataloader_workers",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.checkpoint_layers is not None and self.checkpoint_layers < 0:
            raise ConfigError(
                f"train.checkpoint_layers must be >= 0 or null (all), got {self.checkpoint_layers}"
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"train.max_steps must be -1 (use max_epochs) or >= 1, got {self.max_steps}")


@dataclass
class GenerationArgs:
    """Decoding settings for chat and prediction.

    Args:
        max_new_tokens: longest answer.
        do_sample: sample instead of greedy / beam search.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        top_k: sample among the k most likely tokens.
        repetition_penalty: >1 discourages repeats.
        num_beams: beam search width (1 = off; streamed answers need 1: beam search picks its answer at the end).
        stop: strings that end the answer (not included in it).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    num_beams: int = 1
    stop: list[str] = field(default_factory=list)


@dataclass
class TaskConfig:
    """Everything one run needs."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    method: Method = "lora"
    stage: Stage = "sft"
    lora: LoraArgs = field(default_factory=LoraArgs)
    adalora: AdaLoraArgs = field(default_factory=AdaLoraArgs)
    ptv2: PtuningArgs = field(default_factory=PtuningArgs)
    freeze: FreezeArgs = field(default_factory=FreezeArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    generation: GenerationArgs = field(default_factory=GenerationArgs)
    dpo: DpoArgs = field(default_factory=DpoArgs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "lora": LoraArgs,
    "adalora": AdaLoraArgs,
    "ptv2": PtuningArgs,
    "freeze": FreezeArgs,
    "train": TrainArgs,
    "generation": GenerationArgs,
    "dpo": DpoArgs,
}


def build_parser(description: str, sections: list[str] | None = None) -> ArgumentParser:
    """A parser holding `--config`, `--print_config` and every key of the task config.

    The embedded default (glmtune/demo/default.yaml: the tiny model) is read first, so each script runs on
    its own. Scripts add their own flags (e.g. `--merge`) to the returned parser.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        description=description,
        default_config_files=[str(DEFAULT_CONFIG)],
        exit_on_error=False,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="Task YAML file (default: the embedded default, a copy of config/default.yaml).",
    )
    parser.add_argument("--method", type=Method, default="lora", help="Tuning method.")
    parser.add_argument(
        "--stage",
        type=Stage,
        default="sft",
        help="Training stage: sft (supervised answers), dpo (preference pairs, see the dpo section) or reward "
        "(a pairwise reward model: a value head scoring an answer, trained on the same pairs).",
    )
    for name in sections or list(SECTIONS):
        parser.add_class_arguments(SECTIONS[name], name, fail_untyped=False, sub_configs=True)
    return parser


def _valid_keys(parser: ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions if a.dest not in ("help", "config", "print_config")]


def _suggest(parser: ArgumentParser, message: str) -> str:
    """Append 'did you mean ...' for the first unknown key named in a jsonargparse error."""
    import re

    found = re.search(r"unrecognized arguments: --?([\w.]+)", message) or re.search(
        r"[Gg]roup '([\w.]+)' does not accept (?:option|nested key) '([\w.]+)'", message
    )
    if not found:
        found = re.search(r"[Kk]ey '([\w.]+)' is not expected", message)
    if not found:
        return message
    key = ".".join(g for g in found.groups() if g)
    close = difflib.get_close_matches(key, _valid_keys(parser), n=1, cutoff=0.6)
    hint = f" (unknown key '{key}'; did you mean '{close[0]}'?)" if close else f" (unknown key '{key}')"
    return message.strip() + hint


def parse_args(parser: ArgumentParser, argv: list[str] | None = None) -> tuple[TaskConfig, Namespace]:
    """Parse flags and config files into a TaskConfig, exiting with a clear message on bad keys."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        ns = parser.parse_args(argv)
    except Exception as err:  # jsonargparse raises ArgumentError subclasses with a message
        print(f"error: {_suggest(parser, str(err))}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        return namespace_to_task(ns), ns
    except (ConfigError, ValueError) as err:  # a section's own checks (__post_init__)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def namespace_to_task(ns: Namespace) -> TaskConfig:
    from jsonargparse import Namespace

    kwargs: dict[str, Any] = {"method": ns.get("method", "lora"), "stage": ns.get("stage", "sft")}
    for name, cls in SECTIONS.items():
        section = ns.get(name)
        if section is None:
            continue
        values = section.as_dict() if isinstance(section, Namespace) else dict(section)
        if cls is ModelArgs and values.get("tiny") is not None:
            tiny = values["tiny"]
            values["tiny"] = TinyModelArgs(**(tiny.as_dict() if isinstance(tiny, Namespace) else tiny))
        kwargs[name] = cls(**values)
    return TaskConfig(**kwargs)


def resolve_path(path: str | os.PathLike) -> Path:
    """Config paths are relative to the current directory when they exist there, else to the embedded demo's
    folder (so the default config's `data/train.json` is found wherever glmtune runs)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    in_demo = DEMO_DIR / p
    if not in_demo.exists():
        return p
    _say_the_demo_copy_is_used(str(p))
    return in_demo


@functools.cache
def _say_the_demo_copy_is_used(name: str) -> None:
    # Said once per file: data of the same name the user meant but left in another folder must not be
    # replaced by the demo's without a word.
    print(f"note: no {name} in {Path.cwd()}: using glmtune's demo copy ({DEMO_DIR / name})", file=sys.stderr)


def check_data_files(files: list[str], key: str) -> list[Path]:
    """Resolve data files, failing with the offending path and config key."""
    paths = []
    for f in files:
        p = resolve_path(f)
        if p.is_dir():
            raise ConfigError(f"{key}: {f} is a directory, not a data file (list its files)")
        if not p.is_file():
            raise ConfigError(f"{key}: data file not found: {f}")
        paths.append(p)
    return paths
