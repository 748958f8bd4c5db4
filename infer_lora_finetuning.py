"""Chat with base + LoRA/AdaLoRA/IA3 adapter, or answer a data file (--predict); --merge OUT writes full weights."""

import sys

from glmtune.cli import inference_parser, run_inference
from glmtune.config import parse_args
from glmtune.inference import load_lora


def main(argv: list[str] | None = None) -> int:
    parser = inference_parser(__doc__)
    parser.add_argument("--merge", type=str | None, default=None,
                        help="Merge the adapter into the base weights and save a complete model folder here.")
    cfg, ns = parse_args(parser, argv)
    engine = load_lora(cfg, ns.checkpoint, ns.device)
    if ns.merge:
        from glmtune.merge import merge_and_save

        merge_and_save(engine, ns.merge)
        print(f"merged model written to {ns.merge}")
        return 0
    run_inference(engine, ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
