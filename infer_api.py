"""Serve a model over HTTP: ChatGLM-style POST /, OpenAI-compatible /v1/chat/completions, and (--ui) a web chat.

python infer_api.py                                    # the base model of the task config
python infer_api.py --checkpoint output/run/final      # a trained artifact (LoRA or fine-tuned, read from it)
GLMTUNE_API_KEY=... python infer_api.py --ui          # require a key; also serve the Gradio chat at /chat
"""

import sys

from glmtune.command import serve_main as main

if __name__ == "__main__":
    sys.exit(main())
