"""From a TaskConfig to records on disk: the model folder, its tokenizer and template, then `build_records`.

Shared by `data_utils.py` (build) and `train.py` (build if stale, then train), so both agree on the cache key.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, fields
from pathlib import Path

from glmtune.config import ConfigError, DataArgs, TaskConfig, check_data_files, resolve_path
from glmtune.data.build import build_records
from glmtune.data.report import BuildReport
from glmtune.data.settings import BuildSettings, SettingsError
from glmtune.demo.tiny import ensure_model
from glmtune.models.families import chat_family, resolve_family
from glmtune.models.loading import load_tokenizer
from glmtune.tokenizers.template_choice import get_template, resolve_template_name

TOKENIZER_FILES = (
    "tokenizer.model",
    "ice_text.model",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


# The `data:` keys that are not build settings of the same name: `template` is resolved to the template itself,
# `output_dir` is the settings' `out_dir`.
NOT_BUILD_SETTINGS = ("template", "output_dir")


@dataclass
class PreparedData:
    """The records a config asked for, and what training needs to read them."""

    tokenizer: object
    template_name: str
    report: BuildReport
    settings: BuildSettings

    @property
    def train_path(self) -> Path:
        return self.report.train_dir

    @property
    def eval_path(self) -> Path | None:
        return self.report.eval_dir

    @property
    def eval_source(self) -> str:
        """The `data:` key the eval records come from, for messages."""
        if self.settings.eval_files:
            return "data.eval_files"
        return f"data.eval_ratio={self.settings.eval_ratio}"


def build_settings(data: DataArgs, train_files: list[Path], eval_files: list[Path]) -> BuildSettings:
    """The one place the `data:` keys become the build's settings: every key but NOT_BUILD_SETTINGS is a
    `BuildSettings` field of the same name. A bad value is a ConfigError naming its key."""
    keys = {f.name for f in fields(DataArgs)} - set(NOT_BUILD_SETTINGS)
    same = {f.name: getattr(data, f.name) for f in fields(BuildSettings) if f.name in keys}
    same.update(train_files=train_files, eval_files=eval_files)
    try:
        return BuildSettings(**same, out_dir=data.output_dir)
    except SettingsError as err:
        raise ConfigError(config_problems(err)) from err


def config_problems(err: SettingsError) -> str:
    return "; ".join(f"data.{problem}" for problem in err.problems)


def make_template(model_path: str, family: str, name: str, trust_remote_code: bool = False):
    """Picklable template factory: each tokenizer worker process loads its own copy."""

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

    train_files = check_data_files(cfg.data.train_files, "data.train_files")
    eval_files = check_data_files(cfg.data.eval_files, "data.eval_files")
    settings = build_settings(cfg.data, train_files, eval_files)
    model_path = ensure_model(cfg.model.path, cfg.model.tiny)
    family = resolve_family(resolve_path(cfg.model.path), cfg.model.family)
    name = resolve_template_name(cfg.data.template, chat_family(model_path, family))
    factory = functools.partial(make_template, str(model_path), family, name, cfg.model.trust_remote_code)
    template = factory()
    try:
        report = build_records(
            settings,
            template_factory=factory,
            tokenizer_fingerprint=f"{name}:{tokenizer_fingerprint(model_path)}",
            force=force,
            progress=progress,
        )
    except SettingsError as err:  # the template's protected tokens leave no room, or it has no dialogue mode
        raise ConfigError(config_problems(err)) from err
    return PreparedData(tokenizer=template.tokenizer, template_name=name, report=report, settings=settings)
