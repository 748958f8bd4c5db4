"""Loading what training produced: a base model, a full/freeze/P-Tuning v2 result, or base + PEFT adapter.

A training run's artifact folder holds `hyperparameters.yaml` (the resolved task config), so inference reads
the method, base model and template from there instead of asking the user to retype them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from glmtune.config import ConfigError, TaskConfig, resolve_path
from glmtune.demo.tiny import ensure_model
from glmtune.inference.engine import ChatEngine
from glmtune.models.families import chat_family, model_family
from glmtune.models.loading import load_model, load_tokenizer
from glmtune.tokenizers.template_choice import get_template, resolve_template_name
from glmtune.training.bnb import quantize_bnb, require_bitsandbytes
from glmtune.training.lora_layers import load_lora_adapter
from glmtune.training.registry import HPARAMS_FILE, METHODS, tuning_method


def read_run_config(artifact_dir: str | Path) -> dict:
    """The resolved task config a training run wrote beside its artifact (ConfigError if it is no run)."""
    folder = Path(artifact_dir)
    if not folder.exists():
        raise ConfigError(f"{folder}: no such folder (expected a training artifact, e.g. output/run/final)")
    if not folder.is_dir():
        raise ConfigError(f"{folder}: a file, not a training artifact folder")
    path = folder / HPARAMS_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: no {HPARAMS_FILE} (is this a glmtune training output?)")
    try:
        run = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    if not isinstance(run, dict):
        raise ConfigError(f"{path}: expected the run's config sections, found {type(run).__name__}")
    return run


def run_base_model(run: dict, artifact: Path) -> Path:
    """The base model folder a run was trained on (its hyperparameters' model.path), which must be here."""
    source = artifact / HPARAMS_FILE
    path = (run.get("model") or {}).get("path")
    if not path:
        raise ConfigError(f"{source}: no model.path (the base model the run was trained on)")
    base = resolve_path(path)
    if not base.is_dir():
        raise ConfigError(
            f"{source}: model.path {path} (the base model the run was trained on) is not a folder here"
        )
    return base


def inference_device(cfg: TaskConfig, device: str | None) -> str | None:
    """`--device` checked against this machine and `model.quantization` (None: load on the CPU).

    bitsandbytes weights exist on CUDA only, so a quantized model goes to "cuda" when no device is given,
    and combinations that cannot work are refused before any weights are read.
    """
    mode = cfg.model.quantization
    if device is not None:
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"--device {device}: not a device (cpu, cuda, cuda:1, ...)") from None
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is visible here")
    if mode == "none":
        return device

    if cfg.model.quantization_bit:
        raise ConfigError("model.quantization_bit and model.quantization (bitsandbytes) exclude each other")
    require_bitsandbytes(f"model.quantization={mode}")
    if device is not None and torch.device(device).type != "cuda":
        raise ConfigError(f"model.quantization={mode} runs on CUDA only, not --device {device}")
    return device or "cuda"


def _load_model(path: Path, cfg: TaskConfig, device: str | None, **options) -> torch.nn.Module:
    """load_model with the config's dtype and quantization: ChatGLM's int8/int4 at load, or bitsandbytes
    (the same block linears as training quantizes) once the float weights are in."""

    # Running a folder's own code is consented to per invocation, not inherited from a run's saved config.
    options["trust_remote_code"] = cfg.model.trust_remote_code
    mode = cfg.model.quantization
    if mode == "none":
        return load_model(
            path,
            torch_dtype=cfg.model.dtype,
            quantization_bit=cfg.model.quantization_bit,
            device=device,
            **options,
        )

    model = load_model(path, torch_dtype=cfg.model.dtype, **options)
    # bitsandbytes multiplies in half precision: bf16 where the model was asked for in bf16, else fp16.
    compute = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float16
    return quantize_bnb(model, mode, torch.device(device or "cuda"), compute)


def _engine(
    model: torch.nn.Module, tokenizer_path: str | Path, cfg: TaskConfig, run: dict | None = None
) -> ChatEngine:
    """Wrap a loaded model with its tokenizer and chat template.

    The family is the loaded model's own (not `cfg.model.path`'s, which need not be the base of an artifact).
    The template is `data.template` when set, else the one the run was trained with, else the family's.
    """

    family = model_family(model)
    requested = cfg.data.template
    if requested == "auto" and run is not None:
        requested = (run.get("data") or {}).get("template", "auto")
    name = resolve_template_name(requested, chat_family(tokenizer_path, family))
    tokenizer = load_tokenizer(tokenizer_path, family=family, trust_remote_code=cfg.model.trust_remote_code)
    template = get_template(name, tokenizer)
    model.eval()
    return ChatEngine(model=model, tokenizer=tokenizer, template=template, generation=cfg.generation)


def load_base(cfg: TaskConfig, device: str | None = None) -> ChatEngine:
    """infer.py: the base model as configured (a merged folder's hyperparameters.yaml gives its template)."""

    device = inference_device(cfg, device)
    given = resolve_path(cfg.model.path)
    if (given / HPARAMS_FILE).is_file():
        given_run = read_run_config(given)
        method = METHODS.get(given_run.get("method"))
        if given_run.get("stage") == "reward":
            script = method.script if method is not None else "infer_finetuning.py"
            raise ConfigError(
                f"model.path {cfg.model.path}: a reward model (stage: reward), which scores answers rather than "
                f"writing them: python {script} --checkpoint {cfg.model.path} --predict PAIRS"
            )
        if method is not None and method.artifact != "model":
            raise ConfigError(
                f"model.path {cfg.model.path}: a {method.name} training result, not a model: "
                f"python {method.script} --checkpoint {cfg.model.path}"
            )
    path = ensure_model(cfg.model.path, cfg.model.tiny)
    model = _load_model(path, cfg, device, family=cfg.model.family)
    run = read_run_config(path) if (path / HPARAMS_FILE).is_file() else None
    return _engine(model, path, cfg, run)


def default_artifact(cfg: TaskConfig) -> Path:
    return resolve_path(cfg.train.output_dir) / "final"


def artifact_folder(cfg: TaskConfig, artifact_dir: str | Path | None) -> Path:
    """`--checkpoint`, else the run of the config (<train.output_dir>/final), which must exist then."""
    if artifact_dir:
        return Path(artifact_dir)
    default = default_artifact(cfg)
    if not default.exists():
        raise ConfigError(
            f"no --checkpoint given, and {default} (<train.output_dir>/final) does not exist: "
            "train first (python train.py) or pass --checkpoint DIR"
        )
    return default


def load_finetuned(
    cfg: TaskConfig, artifact_dir: str | Path | None = None, device: str | None = None
) -> ChatEngine:
    """infer_finetuning.py: a `full`/`freeze` model folder, or base + a P-Tuning v2 prefix."""
    device = inference_device(cfg, device)
    artifact = artifact_folder(cfg, artifact_dir)
    run = read_run_config(artifact)
    method = tuning_method(run.get("method"), artifact / HPARAMS_FILE)
    if method.artifact == "adapter":
        raise ConfigError(f"{artifact} holds a {method.name} adapter: use {method.script}")
    if method.artifact == "model":
        return _engine(_load_model(artifact, cfg, device), artifact, cfg, run)
    # A prefix: the base model loaded with it (the published P-Tuning v2 file goes onto its encoder).
    if cfg.model.quantization != "none":
        raise ConfigError(
            f"{artifact}: a P-Tuning v2 prefix does not run on bitsandbytes weights "
            f"(model.quantization={cfg.model.quantization}); use model.quantization_bit 4 / 8 instead"
        )
    base = run_base_model(run, artifact)
    prefix = run.get("ptv2") or {}
    if not prefix.get("pre_seq_len"):
        raise ConfigError(f"{artifact / HPARAMS_FILE}: no ptv2.pre_seq_len for this P-Tuning v2 result")
    model = _load_model(
        base,
        cfg,
        device,
        pre_seq_len=prefix["pre_seq_len"],
        prefix_projection=prefix.get("prefix_projection", False),
        ptuning_checkpoint=artifact,
        family=run["model"].get("family", "auto"),
    )
    return _engine(model, base, cfg, run)


def load_lora(
    cfg: TaskConfig, adapter_dir: str | Path | None = None, device: str | None = None
) -> ChatEngine:
    """infer_lora_finetuning.py: base + PEFT adapter (LoRA, AdaLoRA, IA3)."""

    device = inference_device(cfg, device)
    adapter = artifact_folder(cfg, adapter_dir)
    run = read_run_config(adapter)
    method = METHODS.get(run.get("method"))
    if method is None or method.artifact != "adapter":
        raise ConfigError(
            f"{adapter} holds a {run.get('method')!r} result, not an adapter: use infer_finetuning.py"
        )
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(
            f"{adapter}: no adapter_config.json (the {run['method']} adapter's files are missing)"
        )
    base = run_base_model(run, adapter)
    model = _load_model(base, cfg, device, family=run["model"].get("family", "auto"))
    family = model.glmtune_family
    model = load_lora_adapter(model, adapter)
    model.glmtune_family = family
    return _engine(model, base, cfg, run)


def load_artifact(cfg: TaskConfig, artifact_dir: str | Path, device: str | None = None) -> ChatEngine:
    """Whatever a training run produced: an adapter (load_lora) or a model / prefix (load_finetuned)."""
    method = tuning_method(read_run_config(artifact_dir).get("method"), Path(artifact_dir) / HPARAMS_FILE)
    load = load_lora if method.loader == "lora" else load_finetuned
    return load(cfg, artifact_dir, device)
