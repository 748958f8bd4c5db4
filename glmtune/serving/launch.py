"""infer_api.py's flags, loading what it serves, and running the server with uvicorn."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionYesNo, ArgumentParser

from glmtune.config import ConfigError, TaskConfig, build_parser, parse_args, resolve_path
from glmtune.inference.artifacts import load_artifact, load_base, load_finetuned, load_lora, read_run_config
from glmtune.inference.cli import exits_on_user_error
from glmtune.inference.engine import ChatEngine
from glmtune.inference.reward import load_reward_scorer, reward_artifact
from glmtune.serving.api import create_app
from glmtune.serving.guards import LOOPBACK_HOSTS, header_timeout_protocol
from glmtune.serving.limits import ServingLimits
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
        help="Address to listen on; any but loopback needs an API key (or an explicit --no_auth).",
    )
    parser.add_argument("--port", type=int, default=8000, help="TCP port.")
    parser.add_argument(
        "--api-key",
        "--api_key",
        type=str | None,
        default=None,
        help=f"Require 'Authorization: Bearer KEY'. Visible to every local user in `ps`: prefer ${API_KEY_ENV} "
        "or --api_key_file.",
    )
    parser.add_argument(
        "--api_key_file",
        type=str | None,
        default=None,
        help="Read the API key from this file (its first line).",
    )
    parser.add_argument(
        "--no_auth",
        action=ActionYesNo,
        default=False,
        help="Serve a non-loopback --host without any key: anyone who can reach it can use the model.",
    )
    parser.add_argument(
        "--max_queue",
        type=int,
        default=ServingLimits.max_queue,
        help="Generation requests held at once (running or waiting); past it clients get 429 and Retry-After.",
    )
    parser.add_argument(
        "--max_batch_size",
        type=int,
        default=ServingLimits.max_batch_size,
        help="Answers generated together in one batch (1: one request at a time; streams are never batched).",
    )
    parser.add_argument(
        "--max_body_bytes",
        type=int,
        default=ServingLimits.max_body_bytes,
        help="Largest request body accepted (413 past it).",
    )
    parser.add_argument(
        "--body_timeout",
        type=float,
        default=ServingLimits.body_timeout_s,
        help="Seconds a client may take to send a request body (408 past it).",
    )
    parser.add_argument(
        "--header_timeout",
        type=float,
        default=10.0,
        help="Seconds a client may take to send a request's headers (the connection is closed past it).",
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


def read_api_key(flag: str | None, key_file: str | None) -> str | None:
    """The key from --api_key, --api_key_file or $GLMTUNE_API_KEY (one of them); None when none is given.

    A key that is given but empty is refused: it would silently turn authentication off.
    """
    if flag is not None and key_file is not None:
        raise ConfigError("--api_key and --api_key_file both give a key: pass one")
    if key_file is not None:
        path = resolve_path(key_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--api_key_file {path}: cannot read it ({err})") from None
        key, source = (lines[0].strip() if lines else ""), f"--api_key_file {path}"
    elif flag is not None:
        key, source = flag, "--api_key"
    elif API_KEY_ENV in os.environ:
        key, source = os.environ[API_KEY_ENV], f"${API_KEY_ENV}"
    else:
        return None
    if not key.strip():
        raise ConfigError(f"{source}: the API key is empty (that would let anyone in)")
    return key


def check_auth(host: str, api_key: str | None, no_auth: bool) -> None:
    """A server reachable from other machines needs a key, unless the user says outright that it must not."""
    if api_key and no_auth:
        raise ConfigError("--no_auth and an API key contradict each other: drop one")
    if not api_key and not no_auth and host not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"--host {host} without an API key would serve anyone who can reach it: set ${API_KEY_ENV} or "
            "--api_key_file, or pass --no_auth to do so on purpose"
        )


def allowed_hosts(host: str, api_key: str | None) -> list[str] | None:
    """Host headers a keyless loopback server answers (its own names): a web page that rebinds its DNS name to
    127.0.0.1 sends its own name and is refused. A server with a key, or one open on purpose, takes any."""
    if api_key or host not in LOOPBACK_HOSTS:
        return None
    return sorted({*LOOPBACK_HOSTS, host})


def default_model_name(cfg: TaskConfig, checkpoint: str | None) -> str:
    name = resolve_path(cfg.model.path).name
    if checkpoint is None:
        return name
    artifact = Path(checkpoint).resolve()
    # Runs end in <output_dir>/final: the run folder's name says more than "final".
    return f"{name}+{artifact.parent.name if artifact.name == 'final' else artifact.name}"


def uvicorn_limits(header_timeout_s: float) -> dict:
    """uvicorn settings that keep slow or idle clients from holding connections."""
    return dict(
        http=header_timeout_protocol(header_timeout_s),
        timeout_keep_alive=5,  # an idle keep-alive connection
        h11_max_incomplete_event_size=16 * 1024,  # request line and headers
        # Open streams (a browser's web chat) would otherwise hold Ctrl-C's graceful shutdown open indefinitely.
        timeout_graceful_shutdown=10,
    )


def serving_limits(ns: Any) -> ServingLimits:
    """The server's limits from its flags; a ConfigError for a limit that is not positive."""
    limits = ServingLimits(
        max_queue=ns.max_queue,
        max_batch_size=ns.max_batch_size,
        max_body_bytes=ns.max_body_bytes,
        body_timeout_s=ns.body_timeout,
    )
    flags = ("max_queue", "max_batch_size", "max_body_bytes", "body_timeout", "header_timeout")
    if any(getattr(ns, flag) <= 0 for flag in flags):
        raise ConfigError(f"{', '.join('--' + f for f in flags)} must be positive")
    return limits


@exits_on_user_error
def main(description: str, argv: list[str] | None = None) -> int:
    import uvicorn

    cfg, ns = parse_args(api_parser(description), argv)
    api_key = read_api_key(ns.api_key, ns.api_key_file)
    check_auth(ns.host, api_key, ns.no_auth)
    limits = serving_limits(ns)
    check_address(ns.host, ns.port)
    reward = reward_artifact(cfg, ns.checkpoint) if ns.checkpoint is not None else None
    if reward is not None and ns.ui:
        raise ConfigError(f"--ui: {reward} is a reward model, which scores answers and has no chat page")
    if ns.ui and cfg.generation.num_beams > 1:
        raise ConfigError(
            "--ui streams its answers, which needs generation.num_beams 1 (beam search picks at the end)"
        )
    if ns.ui:
        gradio_module()
    if reward is not None:
        engine, scorer = None, load_reward_scorer(cfg, reward, ns.device)
    else:
        engine, scorer = load_engine(cfg, ns.model_kind, ns.checkpoint, ns.device), None
    name = ns.model_name or default_model_name(cfg, ns.checkpoint)
    app = create_app(
        engine,
        scorer=scorer,
        model_name=name,
        api_key=api_key,
        ui_path="/chat" if ns.ui else None,
        limits=limits,
        allowed_hosts=allowed_hosts(ns.host, api_key),
    )
    where = f"http://{ns.host}:{ns.port}"
    routes = (
        f"POST {where}/v1/score (reward)"
        if scorer
        else f"POST {where}/ (ChatGLM), {where}/v1/chat/completions (OpenAI)"
    )
    print(
        f"serving {name}: {routes}"
        + (f", web chat at {where}/chat" if ns.ui else "")
        + (" (API key required)" if api_key else ""),
        flush=True,
    )
    if ns.no_auth:
        print(
            f"warning: --no_auth: anyone who can reach {ns.host} can use the model",
            file=sys.stderr,
            flush=True,
        )
    uvicorn.run(app, host=ns.host, port=ns.port, log_level="info", **uvicorn_limits(ns.header_timeout))
    return 0
