"""Chat with the base model (python infer.py --config FILE), or answer a data file with --predict."""

import sys

from glmtune.cli import inference_main
from glmtune.inference import load_base

if __name__ == "__main__":
    sys.exit(inference_main(__doc__, load_base, with_checkpoint=False))
