"""Chat with base + LoRA/AdaLoRA/IA3 adapter, or answer a data file (--predict); --merge OUT writes full weights."""

import sys

from glmtune.command import lora_main as main

if __name__ == "__main__":
    sys.exit(main())
