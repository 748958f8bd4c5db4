"""Chat with base + LoRA/AdaLoRA/IA3 adapter, or answer a data file (--predict); --merge OUT writes full weights."""

import sys

from glmtune.config import ConfigError, parse_args
from glmtune.inference.artifacts import artifact_folder, load_lora, read_run_config
from glmtune.inference.cli import check_inference_flags, exits_on_user_error, inference_parser, run_inference
from glmtune.inference.predict import check_predict_paths


@exits_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = inference_parser(__doc__)
    parser.add_argument(
        "--merge",
        type=str | None,
        default=None,
        help="Merge the adapter into the base weights and save a complete model folder here.",
    )
    cfg, ns = parse_args(parser, argv)
    check_inference_flags(ns)
    if ns.merge:
        from glmtune.inference.merge import check_merge_target, merge_and_save

        if ns.predict:
            raise ConfigError("--merge writes a model folder: run --predict on it afterwards, not together")
        if cfg.model.quantization != "none":
            raise ConfigError(
                f"--merge adds the adapter to float weights, not model.quantization={cfg.model.quantization}: "
                "merge with model.quantization none, then quantize the merged model when you load it"
            )
        check_merge_target(ns.merge)
        adapter = artifact_folder(cfg, ns.checkpoint)
        engine = load_lora(cfg, adapter, ns.device)
        merge_and_save(engine, ns.merge, run_config=read_run_config(adapter))
        print(f"merged model written to {ns.merge} (chat with it: python infer.py --model.path {ns.merge})")
        return 0
    if ns.predict:
        check_predict_paths(ns.predict, ns.out)
    engine = load_lora(cfg, ns.checkpoint, ns.device)
    run_inference(engine, ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
