"""Fine-tune a model with the task config (python train.py --config FILE; --help lists every key).

Builds the records if they are stale, loads the model with the chosen method (full, freeze, ptv2, lora,
adalora, ia3), trains with a Lightning Trainer and saves the result under <train.output_dir>/final. The loss
is models.py's ChatModel (`glmtune train` trains with glmtune's CausalLMModule instead).
"""

import sys

from glmtune.command import train_main
from models import ChatModel


def main(argv: list[str] | None = None) -> int:
    return train_main(argv, module_cls=ChatModel)


if __name__ == "__main__":
    sys.exit(main())
