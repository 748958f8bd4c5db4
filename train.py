"""Fine-tune a model with the task config (python train.py --config FILE; --help lists every key).

Builds the records if they are stale, loads the model with the chosen method (full, freeze, ptv2, lora,
adalora, ia3), trains with a Lightning Trainer and saves the result under <train.output_dir>/final.
"""

import sys

from glmtune.config import ConfigError, build_parser, parse_args
from glmtune.data.readers import DataError
from models import ChatModel


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    cfg, _ = parse_args(parser, argv)
    from glmtune.training.module import NonFiniteLossError
    from glmtune.training.trainer import train

    try:
        result = train(cfg, module_cls=ChatModel)
    except (ConfigError, DataError, FileNotFoundError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"saved {cfg.method} result to {result.artifact_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
