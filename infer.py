"""Chat with the base model (python infer.py --config FILE), or answer a data file with --predict."""

from glmtune.cli import inference_main
from glmtune.inference import load_base

if __name__ == "__main__":
    inference_main(__doc__, load_base, with_checkpoint=False)
