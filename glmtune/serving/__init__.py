"""Serving a ChatEngine: the HTTP API (ChatGLM-style and OpenAI-compatible) and the Gradio web chat.

`create_app(engine, ...)` builds the FastAPI app; `infer_api.py` (glmtune.serving.launch) loads a model and
runs it with uvicorn.
"""

from glmtune.serving.api import create_app

__all__ = ["create_app"]
