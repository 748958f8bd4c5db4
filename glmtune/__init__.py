"""glmtune: fine-tune ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B and other causal LMs with Lightning."""

from glmtune.models.loading import load_model, load_tokenizer

__all__ = ["load_model", "load_tokenizer"]
__version__ = "0.1.0"
