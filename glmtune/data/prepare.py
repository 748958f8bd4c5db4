"""From a TaskConfig to records on disk: the model folder, its tokenizer and template, then `build_records`.

Shared by `data_utils.py` (build) and `train.py` (build if stale, then train), so both agree on the cache key.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from glmtune.config import ConfigError, TaskConfig, check_data_files, resolve_path
from glmtune.data.build import BuildReport, SettingsError, build_records
from glmtune.models.families import resolve_family

TOKENIZER_FILES = (
    "tokenizer.model",
    "ice_text.model",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# "chatglm3" is ChatGLM3's chat format (role tokens), so training sees the prompts chat() builds.
FAMILY_TEMPLATES = {"chatglm": "chatglm", "chatglm2": "chatglm2", "chatglm3": "chatglm3"}


@dataclass
class PreparedData:
    tokenizer: object
    template_name: str
    report: BuildReport

    @property
    def train_path(self) -> Path:
        return self.report.train_dir

    @property
    def eval_path(self) -> Path | None:
        return self.report.eval_dir


def template_name(cfg: TaskConfig, family: str) -> str:
    from glmtune.tokenizers.prompts import TEMPLATES

    if cfg.data.template != "auto":
        if cfg.data.template not in TEMPLATES:
            raise ConfigError(
                f"data.template: unknown template {cfg.data.template!r}; "
                f"choose auto or one of {', '.join(TEMPLATES)}"
            )
        return cfg.data.template
    if family not in FAMILY_TEMPLATES:
        raise ConfigError("data.template: choose one (llama2, chatml, alpaca) for a non-ChatGLM model")
    return FAMILY_TEMPLATES[family]


def make_template(model_path: str, family: str, name: str, trust_remote_code: bool = False):
    """Picklable template factory: each tokenizer worker process loads its own copy."""
    from glmtune.models.loading import load_tokenizer
    from glmtune.tokenizers.prompts import get_template

    return get_template(name, load_tokenizer(model_path, family=family, trust_remote_code=trust_remote_code))


def tokenizer_fingerprint(model_path: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        file = model_path / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def prepare_records(cfg: TaskConfig, *, force: bool = False, progress: bool = True) -> PreparedData:
    """Build (or reuse, when the cache key matches) the records `cfg` asks for."""
    from glmtune.demo.tiny import ensure_model

    train_files = check_data_files(cfg.data.train_files, "data.train_files")
    eval_files = check_data_files(cfg.data.eval_files, "data.eval_files")
    model_path = ensure_model(cfg.model.path, cfg.model.tiny)
    family = resolve_family(resolve_path(cfg.model.path), cfg.model.family)
    name = template_name(cfg, family)
    d = cfg.data
    factory = functools.partial(make_template, str(model_path), family, name, cfg.model.trust_remote_code)
    template = factory()
    if d.multi_turn == "dialogue" and template.dialogue_unsupported:
        raise ConfigError(
            f"data.multi_turn: dialogue is not possible with template {name!r}: "
            f"{template.dialogue_unsupported}"
        )
    try:
        report = build_records(
            [str(f) for f in train_files],
            out_dir=d.output_dir,
            template_factory=factory,
            tokenizer_fingerprint=f"{name}:{tokenizer_fingerprint(model_path)}",
            format=d.format,
            max_seq_length=d.max_seq_length,
            max_target_length=d.max_target_length,
            strategy=d.strategy,
            stride=d.stride,
            ensure_answer_min_length=d.ensure_answer_min_length,
            truncate_side=d.truncate_side,
            multi_turn=d.multi_turn,
            packing=d.packing,
            backend=d.backend,
            num_workers=d.num_workers,
            shuffle=d.shuffle,
            seed=d.seed,
            on_error=d.on_error,
            eval_files=[str(f) for f in eval_files] or None,
            eval_ratio=d.eval_ratio,
            force=force,
            progress=progress,
        )
    except SettingsError as err:  # the data.* keys of the same names
        raise ConfigError(f"data: {err}") from err
    return PreparedData(tokenizer=template.tokenizer, template_name=name, report=report)
