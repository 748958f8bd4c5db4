"""Chat with a fully tuned, layer-frozen or P-Tuning v2 result (python infer_finetuning.py --checkpoint DIR)."""

import sys

from glmtune.inference.artifacts import load_finetuned
from glmtune.inference.cli import inference_main

if __name__ == "__main__":
    sys.exit(inference_main(__doc__, load_finetuned))
