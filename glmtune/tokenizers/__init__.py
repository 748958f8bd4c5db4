"""ChatGLM tokenizers (v1, v2, v3, GLM-4), chat prompt templates and a small SentencePiece trainer."""

from glmtune.tokenizers.chatglm import ChatGLMTokenizer
from glmtune.tokenizers.chatglm2 import ChatGLM2Tokenizer, ChatGLM3Tokenizer
from glmtune.tokenizers.glm4 import GLM4Tokenizer
from glmtune.tokenizers.prompts import ChatPrompt, ChatTemplate, TrainSample
from glmtune.tokenizers.template_choice import TEMPLATES, get_template
from glmtune.tokenizers.train_spm import train_chatglm2_tokenizer

__all__ = [
    "TEMPLATES",
    "ChatGLM2Tokenizer",
    "ChatGLM3Tokenizer",
    "ChatGLMTokenizer",
    "ChatPrompt",
    "ChatTemplate",
    "GLM4Tokenizer",
    "TrainSample",
    "get_template",
    "train_chatglm2_tokenizer",
]
