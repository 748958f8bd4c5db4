"""infer_api.py's flags, loading what it serves, and running the server with uvicorn."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Literal

from jsonargparse import ActionYesNo, ArgumentParser

from glmtune.config import ConfigError, TaskConfig, build_parser, parse_args, resolve_path
from glmtune.inference.artifacts import load_artifact, load_base, load_finetuned, load_lora, read_run_config
from glmtune.inference.cli import exits_on_user_error
from glmtune.inference.engine import ChatEngine
from glmtune.serving.api import create_app
from glmtune.serving.web import gradio_module
from glmtune.training.registry import HPARAMS_FILE, tuning_method

ModelKind = Literal["auto", "base", "finetuned", "lora"]
API_KEY_ENV = "GLMTUNE_API_KEY"


def api_parser(description: str) -> ArgumentParser:
    parser = build_parser(description)
    parser.add_argument(
        "--checkpoint",
        type=str | None,
        default=None,
        help="Training artifact folder to serve (default: none, i.e. the base model).",
    )
    parser.add_argument(
        "--model_kind",
        type=ModelKind,
        default="auto",
        help="base, finetuned (full/freeze/ptv2) or lora (lora/adalora/ia3); auto reads the "
        "checkpoint's hyperparameters.yaml (no checkpoint: base).",
    )
    parser.add_argument(
        "--host",
        type=str,
        default="127.0.0.1",
        help="Address to listen on (0.0.0.0 exposes the server to the network: set --api-key).",
    )
    parser.add_argument("--port", type=int, default=8000, help="TCP port.")
    parser.add_argument(
        "--api-key",
        "--api_key",
        type=str | None,
        default=None,
        help=f"Require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key).",
    )
    parser.add_argument(
        "--model_name",
        type=str | None,
        default=None,
        help="Model id in /v1/models and responses (default: the model folder's name).",
    )
    parser.add_argument(
        "--ui",
        action=ActionYesNo,
        default=False,
        help="Also serve the Gradio web chat at /chat (needs gradio).",
    )
    parser.add_argument(
        "--device", type=str | None, default=None, help="cpu, cuda, cuda:1 ... (default: cpu)"
    )
    return parser


def detect_model_kind(checkpoint: str | Path | None) -> Literal["base", "finetuned", "lora"]:
    """The loader a checkpoint needs, from the method in its hyperparameters.yaml."""
    if checkpoint is None:
        return "base"
    path = Path(checkpoint)
    if not (path / HPARAMS_FILE).is_file() and (path / "config.json").is_file():
        raise ConfigError(
            f"{path}: a model folder without {HPARAMS_FILE} (not a training artifact); "
            "serve a complete model folder (e.g. a merged one) with --model.path instead"
        )
    return tuning_method(read_run_config(path).get("method"), path / HPARAMS_FILE).loader


def load_engine(cfg: TaskConfig, kind: ModelKind, checkpoint: str | None, device: str | None) -> ChatEngine:
    """The base model, or the artifact at `checkpoint` loaded as its run's method says (an explicit
    --model_kind insists on its loader, which refuses an artifact of another kind)."""
    if kind == "auto":
        kind = detect_model_kind(checkpoint)
        if kind != "base":
            return load_artifact(cfg, checkpoint, device)
    if kind == "base":
        if checkpoint is not None:
            raise ConfigError(
                "--model_kind base serves --model.path: drop --checkpoint, or pick finetuned/lora"
            )
        return load_base(cfg, device)
    return (load_finetuned if kind == "finetuned" else load_lora)(cfg, checkpoint, device)


def check_address(host: str, port: int) -> None:
    """Refuse an address the server could not listen on, before any time goes into loading the model."""

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, OverflowError) as err:
        raise ConfigError(f"--host {host} --port {port}: not an address to listen on ({err})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None


def default_model_name(cfg: TaskConfig, checkpoint: str | None) -> str:
    name = resolve_path(cfg.model.path).name
    if checkpoint is None:
        return name
    artifact = Path(checkpoint).resolve()
    # Runs end in <output_dir>/final: the run folder's name says more than "final".
    return f"{name}+{artifact.parent.name if artifact.name == 'final' else artifact.name}"


@exits_on_user_error
def main(description: str, argv: list[str] | None = None) -> int:
    import uvicorn

    cfg, ns = parse_args(api_parser(description), argv)
    check_address(ns.host, ns.port)
    if ns.ui:
        gradio_module()
    engine = load_engine(cfg, ns.model_kind, ns.checkpoint, ns.device)
    api_key = ns.api_key or os.environ.get(API_KEY_ENV) or None
    name = ns.model_name or default_model_name(cfg, ns.checkpoint)
    app = create_app(engine, model_name=name, api_key=api_key, ui_path="/chat" if ns.ui else None)
    where = f"http://{ns.host}:{ns.port}"
    print(
        f"serving {name}: POST {where}/ (ChatGLM), {where}/v1/chat/completions (OpenAI)"
        + (f", web chat at {where}/chat" if ns.ui else "")
        + (" (API key required)" if api_key else ""),
        flush=True,
    )
    if not api_key and ns.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {ns.host} without --api-key: anyone who can reach it can use the model",
            file=sys.stderr,
            flush=True,
        )
    # Open streams (a browser's web chat) would otherwise hold Ctrl-C's graceful shutdown open indefinitely.
    uvicorn.run(app, host=ns.host, port=ns.port, log_level="info", timeout_graceful_shutdown=10)
    return 0
