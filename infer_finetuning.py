"""Chat with a fully tuned, layer-frozen or P-Tuning v2 result (python infer_finetuning.py --checkpoint DIR)."""

import sys

from glmtune.cli import inference_main
from glmtune.inference import load_finetuned

if __name__ == "__main__":
    sys.exit(inference_main(__doc__, load_finetuned))
