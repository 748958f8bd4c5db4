"""The `glmtune` command and the mains of the top-level scripts it stands for.

    glmtune data    --config FILE            = python data_utils.py --config FILE
    glmtune train   --config FILE            = python train.py --config FILE (CausalLMModule's loss)
    glmtune chat    --config FILE            = the inference scripts' chat, on the run's result (any method)
    glmtune predict FILE --config FILE       = the same with --predict FILE
    glmtune merge   OUT --config FILE        = python infer_lora_finetuning.py --config FILE --merge OUT
    glmtune serve   --config FILE            = python infer_api.py --config FILE

Each subcommand takes its script's flags and every config key (`glmtune train --help`); the scripts call the
same functions, so the two ways of running a task cannot drift apart.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from glmtune.config import ConfigError, build_parser, parse_args
from glmtune.data.prepare import prepare_records
from glmtune.data.supervision_table import supervision_tables
from glmtune.inference.artifacts import (
    artifact_folder,
    load_artifact,
    load_lora,
    read_run_config,
)
from glmtune.inference.cli import (
    check_inference_flags,
    exits_on_user_error,
    inference_main,
    inference_parser,
    run_inference,
)
from glmtune.inference.merge import MergeFormat, check_merge_target, merge_and_save
from glmtune.inference.predict import check_predict_paths
from glmtune.inference.reward import is_reward_run, reward_artifact, score_main
from glmtune.training.module import CausalLMModule
from glmtune.training.trainer import train

DATA_DOC = """Tokenize the data files of a task into training records (python data_utils.py --config FILE).

Reuses the records when nothing that shapes them changed (data, tokenizer, template rendering, lengths,
strategy), and says why when it rebuilds. Without --config, the embedded default (config/default.yaml) is used.
`--inspect N` then prints the first N training samples as a token / id / label table: the tokens whose label
is not -100 are the ones the loss is computed on."""

TRAIN_DOC = """Fine-tune a model with the task config (python train.py --config FILE; --help lists every key).

Builds the records if they are stale, loads the model with the chosen method (full, freeze, ptv2, lora,
adalora, ia3), trains with a Lightning Trainer and saves the result under <train.output_dir>/final."""

LORA_DOC = "Chat with base + LoRA/AdaLoRA/IA3 adapter, or answer a data file (--predict); --merge OUT writes full weights."

CHAT_DOC = """Chat with a training run's result (<train.output_dir>/final, or --checkpoint DIR), whatever its
method: an adapter loads on its base model, a full / freeze model or P-Tuning v2 prefix as it was saved."""

SERVE_DOC = "Serve a model over HTTP: ChatGLM-style POST /, OpenAI-compatible /v1/chat/completions, and (--ui) a web chat."


@exits_on_user_error
def data_main(argv: list[str] | None = None) -> int:
    """data_utils.py and `glmtune data`: build (or reuse) the records, optionally print samples."""
    parser = build_parser(DATA_DOC)
    parser.add_argument(
        "--force", type=bool, default=False, help="Rebuild even if the records are up to date."
    )
    parser.add_argument(
        "--inspect",
        type=int,
        default=0,
        help="Print the first N training samples as a token / id / label table (label -100: no loss).",
    )
    cfg, ns = parse_args(parser, argv)
    if ns.inspect < 0:
        raise ConfigError(f"--inspect: a number of samples >= 0, not {ns.inspect}")
    prepared = prepare_records(cfg, force=ns.force)
    r = prepared.report
    print(f"records: {r.train_records} train, {r.eval_records} eval in {r.out_dir}")
    if ns.inspect:
        for line in supervision_tables(prepared.train_path, prepared.tokenizer, ns.inspect):
            print(line)
    return 0


@exits_on_user_error
def train_main(argv: list[str] | None = None, module_cls: type[CausalLMModule] = CausalLMModule) -> int:
    """train.py (with models.py's ChatModel) and `glmtune train` (CausalLMModule): train, save the result."""
    cfg, _ = parse_args(build_parser(TRAIN_DOC), argv)
    result = train(cfg, module_cls=module_cls)
    print(f"saved {cfg.method} result to {result.artifact_dir}")
    return 0


@exits_on_user_error
def lora_main(argv: list[str] | None = None) -> int:
    """infer_lora_finetuning.py and `glmtune merge`: chat / predict with an adapter, or merge it (--merge)."""
    parser = inference_parser(LORA_DOC)
    parser.add_argument(
        "--merge",
        type=str | None,
        default=None,
        help="Merge the adapter into the base weights and save a complete model folder here.",
    )
    parser.add_argument(
        "--merge_format",
        type=MergeFormat | None,
        default=None,
        help="With --merge: 'published' (default: the model's own layout and code) or 'transformers' "
        "(ChatGLM2/3, GLM-4 as transformers' GlmForCausalLM with tokenizer.json and chat_template).",
    )
    cfg, ns = parse_args(parser, argv)
    check_inference_flags(ns)
    if ns.merge_format is not None and not ns.merge:
        raise ConfigError("--merge_format applies to --merge only: add --merge OUT, or drop it")
    if ns.merge:
        if ns.predict:
            raise ConfigError("--merge writes a model folder: run --predict on it afterwards, not together")
        if cfg.model.quantization != "none":
            raise ConfigError(
                f"--merge adds the adapter to float weights, not model.quantization={cfg.model.quantization}: "
                "merge with model.quantization none, then quantize the merged model when you load it"
            )
        check_merge_target(ns.merge)
        adapter = artifact_folder(cfg, ns.checkpoint)
        if is_reward_run(read_run_config(adapter)):
            raise ConfigError(
                f"{adapter} is a reward model: --merge would drop its value head (not supported); score with "
                "the adapter as it is (--predict PAIRS)"
            )
        engine = load_lora(cfg, adapter, ns.device)
        merge_and_save(
            engine, ns.merge, run_config=read_run_config(adapter), merge_format=ns.merge_format or "published"
        )
        print(f"merged model written to {ns.merge} (chat with it: python infer.py --model.path {ns.merge})")
        return 0
    if ns.predict:
        check_predict_paths(ns.predict, ns.out)
    reward = reward_artifact(cfg, ns.checkpoint)
    if reward is not None:  # a value head: it scores answers (--predict on pairs) instead of chatting
        return score_main(cfg, reward, ns)
    engine = load_lora(cfg, ns.checkpoint, ns.device)
    run_inference(engine, ns)
    return 0


def load_run(cfg, checkpoint: str | None, device: str | None):
    """The run's result as its method saved it (the loader is read from its hyperparameters.yaml)."""
    return load_artifact(cfg, artifact_folder(cfg, checkpoint), device)


def chat_main(argv: list[str] | None = None) -> int:
    return inference_main(CHAT_DOC, load_run, argv)


@exits_on_user_error
def serve_main(argv: list[str] | None = None) -> int:
    """infer_api.py and `glmtune serve`: the HTTP API (FastAPI and uvicorn are the `serve` extra)."""
    try:
        from glmtune.serving import launch
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"serving needs the package {err.name!r}: install the serve extra (pip install 'glmtune[serve]'; "
            "in the checkout: .venv/bin/pip install -e '.[serve]')"
        ) from None
    return launch.main(SERVE_DOC, argv)


def with_leading_value(command: str, flag: str, what: str) -> Callable[[list[str]], list[str]]:
    """`glmtune predict FILE ...` / `glmtune merge OUT ...`: the first word is the value of `flag`."""

    def to_flags(argv: list[str]) -> list[str]:
        if argv and not argv[0].startswith("-"):
            return [flag, argv[0], *argv[1:]]
        if flag in argv or "-h" in argv or "--help" in argv:
            return argv
        raise ConfigError(f"glmtune {command}: name the {what} first (glmtune {command} {what.upper()} ...)")

    return to_flags


def _no_change(argv: list[str]) -> list[str]:
    return argv


# name: (what it does, its main, how its command line becomes the main's)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int], Callable[[list[str]], list[str]]]] = {
    "data": ("data -> records (data_utils.py)", data_main, _no_change),
    "train": ("records -> <train.output_dir>/final (train.py)", train_main, _no_change),
    "chat": ("chat in the terminal with the run's result", chat_main, _no_change),
    "predict": ("predict FILE: answer every turn of a data file", chat_main, with_leading_value("predict", "--predict", "file")),
    "merge": ("merge OUT: adapter + base -> a full model folder", lora_main, with_leading_value("merge", "--merge", "out")),
    "serve": ("HTTP API (infer_api.py)", serve_main, _no_change),
}  # fmt: skip


def usage() -> str:
    lines = ["usage: glmtune COMMAND [--config FILE] [--section.key VALUE ...]", "", "commands:"]
    lines += [f"  {name:<8} {what}" for name, (what, _, _) in COMMANDS.items()]
    lines += ["", "`glmtune COMMAND --help` lists the command's flags and every config key."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The `glmtune` console command."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 1
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}: choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 1
    _, command_main, to_flags = COMMANDS[name]
    try:
        flags = to_flags(rest)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return command_main(flags)
