"""Flags the inference scripts share, their common main(), and how a script ends on a user's mistake."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec

from glmtune.config import ConfigError, build_parser, parse_args
from glmtune.data.readers import DataError
from glmtune.inference.chat import terminal_chat
from glmtune.inference.engine import ChatEngine
from glmtune.inference.predict import check_predict_paths, predict
from glmtune.inference.reward import reward_artifact, score_main
from glmtune.training.module import NonFiniteLossError

P = ParamSpec("P")

# Path problems the user can fix (a file that is not there, a folder given for a file, no permission): the
# exception's message names the path. Anything else escaping a script is a bug and keeps its traceback.
PATH_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the user asked for something that cannot work", not "glmtune is broken"."""
    return (ConfigError, DataError, NonFiniteLossError, *PATH_ERRORS)


def exits_on_user_error(main: Callable[P, int]) -> Callable[P, int]:
    """Wrap a script's main(): a user's mistake ends in one `error: ...` line on stderr and exit code 1."""

    @functools.wraps(main)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as err:
            if not isinstance(err, user_error_types()):
                raise
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1

    return guarded


def inference_parser(description: str, with_checkpoint: bool = True):
    parser = build_parser(description)
    if with_checkpoint:
        parser.add_argument(
            "--checkpoint",
            type=str | None,
            default=None,
            help="Training artifact folder (default: <train.output_dir>/final).",
        )
    parser.add_argument(
        "--predict",
        type=str | None,
        default=None,
        help="Answer every turn of this data file instead of chatting (any data format).",
    )
    parser.add_argument(
        "--out", type=str | None, default=None, help="With --predict: write predictions (JSONL) here."
    )
    parser.add_argument(
        "--limit", type=int | None, default=None, help="With --predict: only the first N turns."
    )
    parser.add_argument(
        "--batch_size",
        type=int | None,
        default=None,
        help="With --predict: prompts per generate() call (default: 8).",
    )
    # nargs="?": a bare `--stream` means true; `--stream false` still parses.
    parser.add_argument(
        "--stream",
        type=bool,
        nargs="?",
        const=True,
        default=False,
        help="Print the answer as it is generated (chat only).",
    )
    parser.add_argument(
        "--device", type=str | None, default=None, help="cpu, cuda, cuda:1 ... (default: cpu)"
    )
    return parser


def check_inference_flags(ns) -> None:
    """Refuse flags that would do nothing in the chosen mode (chat or --predict), before any model loads."""
    if ns.predict is None:
        ignored = [flag for flag in ("out", "limit", "batch_size") if ns.get(flag) is not None]
        if ignored:
            raise ConfigError(f"--{ignored[0]} applies to --predict only: add --predict FILE, or drop it")
    elif ns.stream:
        raise ConfigError("--stream applies to the terminal chat, not --predict")
    if ns.stream and ns.generation.num_beams > 1:
        raise ConfigError(
            f"--stream needs generation.num_beams 1 (beam search picks its answer at the end; got "
            f"{ns.generation.num_beams})"
        )
    for flag in ("limit", "batch_size"):
        value = ns.get(flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} {value}: must be at least 1")


def run_inference(engine: ChatEngine, ns) -> None:
    if ns.predict:
        predict(
            engine,
            ns.predict,
            out=ns.out,
            limit=ns.limit,
            batch_size=ns.batch_size if ns.batch_size is not None else 8,
        )
    else:
        terminal_chat(engine, stream=ns.stream)


@exits_on_user_error
def inference_main(
    description: str, load: Callable, argv: list[str] | None = None, with_checkpoint: bool = True
) -> int:
    """infer.py and infer_finetuning.py: parse, check the flags, load with `load`, then chat or predict."""
    parser = inference_parser(description, with_checkpoint)
    cfg, ns = parse_args(parser, argv)
    check_inference_flags(ns)
    if ns.predict:
        check_predict_paths(ns.predict, ns.out)
    if with_checkpoint:
        reward = reward_artifact(cfg, ns.checkpoint)
        if reward is not None:  # a value head: it scores answers (--predict on pairs) instead of chatting
            return score_main(cfg, reward, ns)
    engine = load(cfg, ns.checkpoint, ns.device) if with_checkpoint else load(cfg, ns.device)
    run_inference(engine, ns)
    return 0
