"""Chat with base + LoRA/AdaLoRA/IA3 adapter, or answer a data file (--predict); --merge OUT writes full weights."""

import sys
from pathlib import Path

from glmtune.cli import inference_parser, run_inference
from glmtune.config import parse_args
from glmtune.inference import default_artifact, load_lora, read_run_config


def main(argv: list[str] | None = None) -> int:
    parser = inference_parser(__doc__)
    parser.add_argument(
        "--merge",
        type=str | None,
        default=None,
        help="Merge the adapter into the base weights and save a complete model folder here.",
    )
    cfg, ns = parse_args(parser, argv)
    if ns.merge:
        from glmtune.merge import MergeError, merge_and_save

        adapter = Path(ns.checkpoint) if ns.checkpoint else default_artifact(cfg)
        engine = load_lora(cfg, adapter, ns.device)
        try:
            merge_and_save(engine, ns.merge, run_config=read_run_config(adapter))
        except MergeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"merged model written to {ns.merge} (chat with it: python infer.py --model.path {ns.merge})")
        return 0
    engine = load_lora(cfg, ns.checkpoint, ns.device)
    run_inference(engine, ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
