"""`glmtune.Tuner`: fine-tune, chat, score and merge from Python, in a few chained calls.

    tuner = glmtune.Tuner()                         # the embedded tiny ChatGLM2, LoRA
    metrics = tuner.load_data("data/train.json").tune(max_epochs=2)
    response, history = tuner.chat("山间茶舍几点开门？")
    scores = tuner.eval("data/dev.json")

    rm = glmtune.Tuner(train={"output_dir": "output/reward"})   # a reward model on preference pairs
    rm.load_data("data/samples/preference_train.jsonl").tune(stage="reward", max_epochs=24)
    rm.score("山间茶舍几点开门？", "每天早上九点开门。")            # a float: higher is better

In the spirit of hcgf's `GlmLora(...).load_data(...).tune()`, but a thin facade: the arguments are the task
config's keys (validated like the command line's), tuning is `glmtune.training.trainer.train`, and chat and
scoring are the inference scripts' `ChatEngine` and `predict`. Whatever a Tuner does, the scripts do the same
given the same config.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glmtune.config import ConfigError, TaskConfig, _suggest, build_parser, namespace_to_task
from glmtune.inference.artifacts import load_artifact, load_base, read_run_config
from glmtune.inference.engine import ChatEngine, History
from glmtune.inference.merge import merge_and_save
from glmtune.inference.predict import predict
from glmtune.inference.reward import RewardScorer, is_reward_run, load_reward_scorer, predict_pairs
from glmtune.training.module import CausalLMModule
from glmtune.training.trainer import train as run_training

PathLike = str | os.PathLike


class Tuner:
    """One model, its tuning method and data, and the model to chat with.

    Args:
        model_path: checkpoint folder; None keeps the config's `model.path` (by default the embedded tiny
            ChatGLM2, built on first use). A path given here is used as is (no tiny model is built there).
        method: full, freeze, ptv2, lora, adalora or ia3; None keeps the config's (lora by default).
        config: a task YAML to start from instead of config/default.yaml.
        device: where inference runs ("cpu", "cuda", "cuda:1"; default cpu). Training follows
            `train.accelerator` / `train.devices`.
        module_cls: the LightningModule class to train with: CausalLMModule by default, whose loss is the
            one `models.ChatModel` (what train.py trains with) has until edited; pass ChatModel, or a subclass
            overriding `loss`, to tune with a changed loss.
        **overrides: config sections as dicts, e.g. `lora={"r": 16}`, `train={"output_dir": "output/mine"}`,
            `generation={"max_new_tokens": 128}`. Unknown keys and wrong types raise ConfigError.
    """

    def __init__(
        self,
        model_path: PathLike | None = None,
        method: str | None = None,
        *,
        config: PathLike | None = None,
        device: str | None = None,
        module_cls: type[CausalLMModule] | None = None,
        **overrides: dict[str, Any],
    ) -> None:
        self._parser = build_parser("glmtune.Tuner")
        # The config is whatever these flags parse to, exactly as a script would parse its command line.
        self._flags: list[str] = []
        if config is not None:
            if not Path(config).is_file():
                raise ConfigError(f"config: file not found: {config}")
            self._flags += ["--config", str(config)]
        changes: dict[str, Any] = dict(overrides)
        if method is not None:
            changes["method"] = method
        if model_path is not None:
            changes["model"] = {"path": str(model_path), "tiny": None, **changes.get("model", {})}
        self._update(changes)
        self.device = device
        self.module_cls = module_cls
        self.artifact: Path | None = None  # the tuned (or loaded) result chat and eval use; None = base model
        self.train_metrics: dict[str, float] = {}
        self._engine: ChatEngine | None = None
        self._scorer: RewardScorer | None = None

    # -- config ------------------------------------------------------------------------------------------

    @property
    def cfg(self) -> TaskConfig:
        """The resolved task config (a copy: change it through the methods' arguments)."""
        return copy.deepcopy(self._cfg)

    def _parse(self, flags: list[str]):

        try:
            return self._parser.parse_args(flags)
        except Exception as err:  # jsonargparse reports bad keys / types as ArgumentError
            raise ConfigError(_suggest(self._parser, str(err))) from err

    def _update(self, changes: dict[str, Any]) -> None:
        """Apply {section: {key: value}} (or {"method": name}); checked at once, so a bad key fails here."""
        flags = []
        for name, value in changes.items():
            if isinstance(value, dict):
                flags += [f"--{name}.{key}={_flag_value(v)}" for key, v in value.items()]
            else:
                flags.append(f"--{name}={_flag_value(value)}")
        self._cfg = namespace_to_task(self._parse(self._flags + flags))
        self._flags += flags

    # -- tuning ------------------------------------------------------------------------------------------

    def load_data(
        self,
        train_files: PathLike | Sequence[PathLike],
        eval_files: PathLike | Sequence[PathLike] | None = None,
        **data: Any,
    ) -> Tuner:
        """Data to tune on (any format of glmtune.data; a file or a list of files), optionally data to
        evaluate on after each epoch, and other `data.*` keys (max_seq_length, format, template, ...)."""
        self._update(
            {"data": {**data, "train_files": _as_list(train_files), "eval_files": _as_list(eval_files)}}
        )
        return self

    def tune(self, stage: str | None = None, **train: Any) -> dict[str, float]:
        """Train with `train.*` keys overridden (max_epochs, learning_rate, batch_size, output_dir, ...);
        returns the final metrics (train_loss, val_loss where there is eval data). Chat and eval then use
        the result, saved in <train.output_dir>/final. `stage`: sft, dpo or reward (None keeps the config's);
        dpo and reward train on preference pairs (load_data with pair files); a reward model then scores
        (`score`, and `eval` on pairs) instead of chatting."""

        changes: dict[str, Any] = {"stage": stage} if stage is not None else {}
        if train:
            changes["train"] = train
        if changes:
            self._update(changes)

        result = run_training(self.cfg, module_cls=self.module_cls or CausalLMModule)
        self.artifact = result.artifact_dir
        self.train_metrics = result.metrics
        self._engine = None
        self._scorer = None
        return result.metrics

    # -- using the model ---------------------------------------------------------------------------------

    def load_pretrained(self, artifact_dir: PathLike) -> Tuner:
        """Chat with / evaluate a saved result (an adapter, a P-Tuning v2 prefix or a full model folder):
        the folder a run wrote as <train.output_dir>/final. Its base model comes from its hyperparameters.yaml."""
        path = Path(artifact_dir)
        self._engine, self._scorer = None, None
        self.artifact = path
        if not self._is_reward():
            self._engine = load_artifact(self.cfg, path, self.device)
        return self

    def _is_reward(self) -> bool:
        return self.artifact is not None and is_reward_run(read_run_config(self.artifact))

    @property
    def scorer(self) -> RewardScorer:
        """The `stage: reward` result as a RewardScorer (glmtune.inference.reward), loaded on first use."""
        if self.artifact is None:
            raise ValueError("score: nothing tuned or loaded yet (tune(stage='reward') or load_pretrained())")
        if self._scorer is None:
            self._scorer = load_reward_scorer(self.cfg, self.artifact, self.device)
        return self._scorer

    def score(
        self, prompt: str, answer: str, history: History | None = None, system: str | None = None
    ) -> float:
        """A reward model's score of `answer` to `prompt` (after `history`): higher is better."""
        return self.scorer.score(prompt, answer, history, system)

    @property
    def engine(self) -> ChatEngine:
        """The model chat and eval use: the tuned / loaded result, else the base model (loaded on first use)."""
        if self._engine is None:
            if self._is_reward():
                raise ConfigError(
                    f"{self.artifact} is a reward model: it scores answers (score(), or eval() on preference "
                    "pairs) and does not chat"
                )
            cfg = self.cfg
            self._engine = (
                load_artifact(cfg, self.artifact, self.device)
                if self.artifact
                else load_base(cfg, self.device)
            )
        return self._engine

    def chat(self, query: str, history: History | None = None, **generation: Any) -> tuple[str, History]:
        """One answer; returns (response, history + [(query, response)]). `generation.*` keys override the
        config for this call (max_new_tokens, do_sample, temperature, top_p, top_k, num_beams,
        repetition_penalty, stop)."""
        return self.engine.chat(query, history, **generation)

    def eval(
        self,
        path: PathLike | None = None,
        *,
        out: PathLike | None = None,
        limit: int | None = None,
        batch_size: int = 8,
        verbose: bool = False,
    ) -> dict[str, Any]:
        """Answer every turn of a data file (default: the one `data.eval_files` names) and score it:
        samples, exact_match, and ROUGE-1/2/L and BLEU-4 (percent). `out` saves predictions as JSON lines.
        A reward model scores the pairs of a preference file instead: pairs, reward_accuracy, reward_margin."""
        if path is None:
            files = self.cfg.data.eval_files
            if len(files) != 1:
                raise ValueError(f"eval: pass a data file (data.eval_files holds {len(files)}: {files})")
            path = files[0]
        if self._is_reward():
            return predict_pairs(self.scorer, path, out=out, limit=limit, batch_size=batch_size, show=verbose)
        return predict(self.engine, path, out=out, limit=limit, batch_size=batch_size, show=verbose)

    def merge(self, out: PathLike) -> Path:
        """Fold the tuned adapter into the base weights and write a complete model folder (see
        glmtune.inference.merge). Chat goes on with the merged model."""
        if self.artifact is None:
            raise ValueError("merge: nothing tuned or loaded yet (call tune() or load_pretrained() first)")
        return merge_and_save(self.engine, out, run_config=read_run_config(self.artifact))


def _flag_value(value: Any) -> str:
    """A Python value as the command line spells it: strings as they are, the rest as JSON (lists, null)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _as_list(files: PathLike | Sequence[PathLike] | None) -> list[str]:
    if files is None:
        return []
    if isinstance(files, str | os.PathLike):
        return [str(files)]
    return [str(f) for f in files]
