"""glmtune: fine-tune ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B and other causal LMs with Lightning."""

from glmtune.models.loading import load_model, load_tokenizer
from glmtune.tuner import Tuner

__all__ = ["Tuner", "load_model", "load_tokenizer"]
__version__ = "0.1.0"
