"""Flags the inference scripts share, and their common main()."""

from __future__ import annotations

from collections.abc import Callable

from glmtune.config import build_parser, parse_args
from glmtune.generation import ChatEngine


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
        "--batch_size", type=int, default=8, help="With --predict: prompts per generate() call."
    )
    # nargs="?": a bare `--stream` means true; `--stream false` still parses.
    parser.add_argument(
        "--stream",
        type=bool,
        nargs="?",
        const=True,
        default=False,
        help="Print the answer as it is generated.",
    )
    parser.add_argument(
        "--device", type=str | None, default=None, help="cpu, cuda, cuda:1 ... (default: cpu)"
    )
    return parser


def run_inference(engine: ChatEngine, ns) -> None:
    from glmtune.inference import predict, terminal_chat

    if ns.predict:
        predict(engine, ns.predict, out=ns.out, limit=ns.limit, batch_size=ns.batch_size)
    else:
        terminal_chat(engine, stream=ns.stream)


def inference_main(
    description: str, load: Callable, argv: list[str] | None = None, with_checkpoint: bool = True
):
    parser = inference_parser(description, with_checkpoint)
    cfg, ns = parse_args(parser, argv)
    engine = load(cfg, ns.checkpoint, ns.device) if with_checkpoint else load(cfg, ns.device)
    run_inference(engine, ns)
    return engine, ns
