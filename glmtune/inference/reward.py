"""Scoring answers with a `stage: reward` result, and its `--predict` on preference pairs.

    scorer = load_reward_scorer(cfg, "output/reward/final")
    scorer.score("山间茶舍几点开门？", "每天早上九点开门。")                 # -> float
    scorer.score_pairs(prompts, answers, histories, systems)             # -> list[float], batched

The artifact is the method's (adapter, model folder or prefix) with the value head beside it
(glmtune.models.value_head); it loads as the inference scripts load any result. An answer is rendered
exactly as training rendered it: the chat prompt (history and system prompt included) then the answer and its
end token, shortened as the run's `data.max_seq_length` shortened pairs (prompt tokens first).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from glmtune.config import ConfigError, DataArgs, TaskConfig, resolve_path
from glmtune.data.dataset import Collator
from glmtune.data.preference import PreferencePair, fit_pair, iter_pairs, pair_sample
from glmtune.data.samples import answer_header_length
from glmtune.data.settings import LengthSettings
from glmtune.inference.artifacts import artifact_folder, load_artifact, read_run_config
from glmtune.inference.engine import History
from glmtune.inference.predict import check_predict_paths, write_results
from glmtune.models.value_head import RewardModel, hidden_size, load_value_head

REWARD_STAGE = "reward"


class RewardScorer:
    """A reward model with its tokenizer and chat template: answers in, one float each out (higher: better).

    Not thread-safe (one forward at a time); a server serialises its calls."""

    def __init__(
        self, model: RewardModel, tokenizer: Any, template: Any, lengths: LengthSettings, batch_size: int = 8
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.lengths = lengths
        self.batch_size = batch_size
        self.device = next(model.parameters()).device

    def encode(
        self, prompt: str, answer: str, history: History | None = None, system: str | None = None
    ) -> list[int]:
        """The token ids training scored for this prompt and answer: chat prompt + answer + end token."""
        pair = PreferencePair(
            prompt, answer, answer, [tuple(turn) for turn in history or []], system, "score"
        )
        prompt_ids, answer_ids, _ = pair_sample(pair, self.template)
        prompt_ids, answer_ids, _ = fit_pair(prompt_ids, answer_ids, answer_ids, self.lengths)
        return prompt_ids + answer_ids

    def score(
        self, prompt: str, answer: str, history: History | None = None, system: str | None = None
    ) -> float:
        """The reward of `answer` to `prompt` (after the `history` turns, under an optional system prompt)."""
        return self.score_pairs([prompt], [answer], [history], [system])[0]

    def score_pairs(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        histories: Sequence[History | None] | None = None,
        systems: Sequence[str | None] | None = None,
    ) -> list[float]:
        """The reward of each (prompt, answer) row, `batch_size` rows per forward; histories / systems are
        per row (None: none)."""
        rows = len(prompts)
        histories = histories if histories is not None else [None] * rows
        systems = systems if systems is not None else [None] * rows
        if not rows == len(answers) == len(histories) == len(systems):
            raise ValueError(
                f"score_pairs: {rows} prompts, {len(answers)} answers, {len(histories)} histories and "
                f"{len(systems)} systems: one of each per row"
            )
        return self.score_ids(
            [self.encode(*row) for row in zip(prompts, answers, histories, systems, strict=True)]
        )

    def encode_pair(self, pair: PreferencePair) -> tuple[list[int], list[int]]:
        """A preference pair's two sequences as training built them: a prompt too long for both answers is
        shortened once, for the longer one (so `--predict` on the eval pairs gives the run's eval rewards)."""
        prompt_ids, chosen, rejected = fit_pair(*pair_sample(pair, self.template), self.lengths)
        return prompt_ids + chosen, prompt_ids + rejected

    @torch.inference_mode()
    def score_ids(self, ids: Sequence[Sequence[int]], batch_size: int | None = None) -> list[float]:
        """The reward of each token sequence (a rendered prompt and answer), `batch_size` (default: the
        scorer's) per forward."""
        rows, batch_size = len(ids), batch_size or self.batch_size
        collate = Collator(pad_token_id=self.tokenizer.pad_token_id)
        rewards: list[float] = []
        for start in range(0, rows, batch_size):
            batch = collate([{"input_ids": torch.tensor(row)} for row in ids[start : start + batch_size]])
            out = self.model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            rewards += out.tolist()
        return rewards


def is_reward_run(run: dict) -> bool:
    return run.get("stage") == REWARD_STAGE


def reward_artifact(cfg: TaskConfig, checkpoint: str | Path | None) -> Path | None:
    """The artifact folder (`--checkpoint`, else <train.output_dir>/final) when it holds a reward model."""
    folder = artifact_folder(cfg, checkpoint)
    return folder if is_reward_run(read_run_config(folder)) else None


def run_lengths(run: dict, template: Any) -> LengthSettings:
    """How the run shortened too long pairs (its `data:` length keys), for the template's protected tokens."""
    data = DataArgs(**(run.get("data") or {}))
    # As BuildSettings.lengths_for: the template's protected tokens, and its answer header at the prompt's end.
    return LengthSettings(
        max_seq_length=data.max_seq_length,
        max_target_length=data.max_target_length,
        truncate_side=data.truncate_side,
        protected_head=int(getattr(template, "protected_head", 0) or 0),
        protected_tail=max(int(getattr(template, "protected_tail", 0) or 0), answer_header_length(template)),
    )


def load_reward_scorer(
    cfg: TaskConfig, artifact_dir: str | Path | None = None, device: str | None = None
) -> RewardScorer:
    """The `stage: reward` result in `artifact_dir` (default <train.output_dir>/final) as a RewardScorer: its
    method's artifact loaded as the inference scripts load it (`cfg.model.dtype`, quantization, template),
    plus its value head."""
    folder = artifact_folder(cfg, artifact_dir)
    run = read_run_config(folder)
    if not is_reward_run(run):
        raise ConfigError(
            f"{folder}: trained with stage {run.get('stage', 'sft')!r}, not reward, so it has no value head "
            "to score with (python train.py --stage reward trains one)"
        )
    engine = load_artifact(cfg, folder, device)
    model = engine.model
    head = load_value_head(folder, hidden_size(model)).to(next(model.parameters()).device)
    return RewardScorer(
        RewardModel(model, head), engine.tokenizer, engine.template, run_lengths(run, engine.template)
    )


def predict_pairs(
    scorer: RewardScorer,
    file: str | Path,
    *,
    out: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    show: bool = True,
) -> dict:
    """Score both answers of every pair of a preference file; the accuracy is the share of pairs whose chosen
    answer scores higher. With `out`: the scored pairs to OUT (JSON lines), the summary to OUT with suffix
    .metrics.json. The last line printed is `reward accuracy: K/N`."""
    check_predict_paths(file, out)
    pairs = list(iter_pairs(resolve_path(file)))[:limit]
    if not pairs:
        raise ConfigError(f"--predict {file}: no preference pairs to score")
    rows = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        encoded = [scorer.encode_pair(pair) for pair in chunk]
        rewards = scorer.score_ids([c for c, _ in encoded] + [r for _, r in encoded], 2 * batch_size)
        for i, pair in enumerate(chunk):
            chosen, rejected = rewards[i], rewards[len(chunk) + i]
            rows.append(
                {
                    "prompt": pair.query,
                    "history": [list(turn) for turn in pair.history],
                    "system": pair.system,
                    "chosen": pair.chosen,
                    "rejected": pair.rejected,
                    "chosen_reward": chosen,
                    "rejected_reward": rejected,
                    "source": pair.source,
                }
            )
            if show:
                mark = "ok " if chosen > rejected else "BAD"
                print(f"{mark} chosen {chosen:+.3f}  rejected {rejected:+.3f}  {pair.query}", flush=True)
    right = sum(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    summary = {
        "pairs": len(rows),
        "reward_accuracy": right / len(rows),
        "reward_accuracy_count": right,
        "reward_margin": sum(r["chosen_reward"] - r["rejected_reward"] for r in rows) / len(rows),
    }
    if out:
        write_results(Path(out), rows, summary)
    if show:
        if out:
            print(f"scored pairs written to {out}, summary to {Path(out).with_suffix('.metrics.json')}")
        print(f"reward margin: {summary['reward_margin']:.4f}")
        print(f"reward accuracy: {right}/{len(rows)}", flush=True)
    return summary


def score_main(cfg: TaskConfig, folder: Path, ns: Any) -> int:
    """The inference scripts on a reward result: `--predict PAIRS` prints the accuracy; there is no chat."""
    if not ns.predict:
        raise ConfigError(
            f"{folder} is a reward model: it scores answers and does not write any. --predict PAIRS.jsonl "
            "prints its accuracy on preference pairs; from Python: "
            "glmtune.inference.reward.load_reward_scorer(cfg, folder).score(prompt, answer)"
        )
    check_predict_paths(ns.predict, ns.out)
    scorer = load_reward_scorer(cfg, folder, ns.device)
    batch_size = ns.batch_size if ns.batch_size is not None else 8
    predict_pairs(scorer, ns.predict, out=ns.out, limit=ns.limit, batch_size=batch_size)
    return 0
