"""glmtune: fine-tune ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B and other causal LMs with Lightning."""

import warnings

from glmtune.models.loading import load_model, load_tokenizer
from glmtune.tuner import Tuner

# PEFT (0.21) reads transformers' deprecated `is_gradient_checkpointing` alias each time it wraps a model, so
# every LoRA run and load would warn about a line in PEFT that glmtune's users cannot act on.
warnings.filterwarnings(
    "ignore",
    message="`is_gradient_checkpointing` is deprecated",
    category=FutureWarning,
    module="transformers",
)

__all__ = ["Tuner", "load_model", "load_tokenizer"]
__version__ = "0.1.0"
