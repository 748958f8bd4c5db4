"""Chat with the base model (python infer.py --config FILE), or answer a data file with --predict."""

import sys

from glmtune.inference.artifacts import load_base
from glmtune.inference.cli import inference_main

if __name__ == "__main__":
    sys.exit(inference_main(__doc__, load_base, with_checkpoint=False))
