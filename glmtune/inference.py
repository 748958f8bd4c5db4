"""What the three inference scripts share: loading base / fine-tuned / LoRA models, terminal chat, prediction.

A training run's artifact folder holds `hyperparameters.yaml` (the resolved task config), so inference reads
the method, base model and template from there instead of asking the user to retype them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

import torch
import yaml

from glmtune.config import TaskConfig, resolve_path
from glmtune.generation import ChatEngine, History

COMMANDS_HELP = "commands: 'clear' starts a new conversation, 'exit' quits"


HPARAMS_FILE = "hyperparameters.yaml"


def read_run_config(artifact_dir: str | Path) -> dict:
    path = Path(artifact_dir) / HPARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{artifact_dir}: no hyperparameters.yaml (is this a glmtune training output?)"
        )
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _engine(
    model: torch.nn.Module, tokenizer_path: str | Path, cfg: TaskConfig, run: dict | None = None
) -> ChatEngine:
    """Wrap a loaded model with its tokenizer and chat template.

    The family is the loaded model's own (not `cfg.model.path`'s, which need not be the base of an artifact).
    The template is `data.template` when set, else the one the run was trained with, else the family's.
    """
    from glmtune.data.prepare import FAMILY_TEMPLATES
    from glmtune.models.loading import load_tokenizer
    from glmtune.tokenizers.prompts import get_template

    family = getattr(model, "glmtune_family", None) or "hf"
    name = cfg.data.template
    if name == "auto" and run is not None:
        name = (run.get("data") or {}).get("template", "auto")
    if name == "auto":
        if family not in FAMILY_TEMPLATES:
            raise ValueError("data.template: choose one (llama2, chatml, alpaca) for a non-ChatGLM model")
        name = FAMILY_TEMPLATES[family]
    tokenizer = load_tokenizer(tokenizer_path, family=family)
    template = get_template(name, tokenizer)
    model.eval()
    return ChatEngine(model=model, tokenizer=tokenizer, template=template, generation=cfg.generation)


def load_base(cfg: TaskConfig, device: str | None = None) -> ChatEngine:
    """infer.py: the base model as configured (a merged folder's hyperparameters.yaml gives its template)."""
    from glmtune.models.loading import load_model
    from glmtune.models.tiny import ensure_model

    path = ensure_model(cfg.model.path, cfg.model.tiny)
    model = load_model(
        path,
        torch_dtype=cfg.model.dtype,
        quantization_bit=cfg.model.quantization_bit,
        family=cfg.model.family,
        device=device,
    )
    run = read_run_config(path) if (path / HPARAMS_FILE).is_file() else None
    return _engine(model, path, cfg, run)


def default_artifact(cfg: TaskConfig) -> Path:
    return resolve_path(cfg.train.output_dir) / "final"


def load_finetuned(
    cfg: TaskConfig, artifact_dir: str | Path | None = None, device: str | None = None
) -> ChatEngine:
    """infer_finetuning.py: a `full`/`freeze` model folder, or base + a P-Tuning v2 prefix."""
    from glmtune.models.loading import load_model

    artifact = Path(artifact_dir) if artifact_dir else default_artifact(cfg)
    run = read_run_config(artifact)
    method = run.get("method")
    if method in ("full", "freeze"):
        model = load_model(
            artifact, torch_dtype=cfg.model.dtype, quantization_bit=cfg.model.quantization_bit, device=device
        )
        return _engine(model, artifact, cfg, run)
    if method == "ptv2":
        base = resolve_path(run["model"]["path"])
        model = load_model(
            base,
            torch_dtype=cfg.model.dtype,
            quantization_bit=cfg.model.quantization_bit,
            pre_seq_len=run["ptv2"]["pre_seq_len"],
            prefix_projection=run["ptv2"]["prefix_projection"],
            ptuning_checkpoint=artifact,
            family=run["model"].get("family", "auto"),
            device=device,
        )
        return _engine(model, base, cfg, run)
    raise ValueError(
        f"{artifact} was trained with method {method!r}: use infer_lora_finetuning.py for adapters"
    )


def load_lora(
    cfg: TaskConfig, adapter_dir: str | Path | None = None, device: str | None = None
) -> ChatEngine:
    """infer_lora_finetuning.py: base + PEFT adapter (LoRA, AdaLoRA, IA3)."""
    from peft import PeftModel

    from glmtune.models import quantization
    from glmtune.models.loading import load_model

    adapter = Path(adapter_dir) if adapter_dir else default_artifact(cfg)
    run = read_run_config(adapter)
    if run.get("method") not in ("lora", "adalora", "ia3"):
        raise ValueError(
            f"{adapter} holds a {run.get('method')!r} result, not an adapter: use infer_finetuning.py"
        )
    base = resolve_path(run["model"]["path"])
    model = load_model(
        base,
        torch_dtype=cfg.model.dtype,
        quantization_bit=cfg.model.quantization_bit,
        family=run["model"].get("family", "auto"),
        device=device,
    )
    family = model.glmtune_family
    quantization.register_with_peft()
    model = PeftModel.from_pretrained(model, str(adapter))
    model.glmtune_family = family
    return _engine(model, base, cfg, run)


def load_artifact(cfg: TaskConfig, artifact_dir: str | Path, device: str | None = None) -> ChatEngine:
    """Whatever a training run produced: an adapter (load_lora) or a model / prefix (load_finetuned)."""
    method = read_run_config(artifact_dir).get("method")
    if method in ("lora", "adalora", "ia3"):
        return load_lora(cfg, artifact_dir, device)
    return load_finetuned(cfg, artifact_dir, device)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (not to be shown yet)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[len(text) - n :]):
                longest = n
                break
    return longest


def fit_history(engine: ChatEngine, query: str, history: History) -> History:
    """Drop the oldest turns until prompt + max_new_tokens fits the model's context (a long chat goes on)."""
    limit = engine.context_length
    if limit is None:
        return history
    room = limit - engine.generation.max_new_tokens
    while history and len(engine.prompt_ids(query, history)) > room:
        history = history[1:]
    if len(engine.prompt_ids(query, history)) > room:
        raise ValueError(
            f"the question is longer than the model's context ({limit} tokens, "
            f"{engine.generation.max_new_tokens} of them kept for the answer by generation.max_new_tokens)"
        )
    return history


def terminal_chat(
    engine: ChatEngine, stream: bool = False, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> History:
    """A multi-turn chat on stdin/stdout with history, `clear` and `exit`; returns the last conversation.

    Generation settings (length, sampling, beams, stop strings) are `engine.generation`, i.e. the
    `generation.*` config keys. A streamed answer holds back text that may turn out to start a stop string,
    so stop strings never appear, streamed or not.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    history: History = []
    print(f"glmtune chat ({COMMANDS_HELP})", file=stdout, flush=True)
    try:
        while (after := _chat_turn(engine, history, stream, stdin, stdout)) is not None:
            history = after
    except KeyboardInterrupt:  # Ctrl-C ends the chat like `exit`
        pass
    print(file=stdout, flush=True)
    return history


def _chat_turn(
    engine: ChatEngine, history: History, stream: bool, stdin: TextIO, stdout: TextIO
) -> History | None:
    """Read lines until one is a question and answer it; the history after it, or None at `exit` / end of input."""
    stops = engine.generation.stop
    while True:
        print("\nuser: ", end="", file=stdout, flush=True)
        line = stdin.readline()
        query = line.strip()
        if not line or query == "exit":
            return None
        if not query:
            continue
        if query == "clear":
            print("(history cleared)", file=stdout, flush=True)
            return []
        try:
            history = fit_history(engine, query, history)
        except ValueError as err:
            print(f"error: {err}", file=stdout, flush=True)
            continue
        print("assistant: ", end="", file=stdout, flush=True)
        if stream:
            shown, printed = "", 0
            for shown in engine.stream_chat(query, history):
                safe = len(shown) - held_back(shown, stops)
                print(shown[printed:safe], end="", file=stdout, flush=True)
                printed = max(printed, safe)
            print(shown[printed:], file=stdout, flush=True)
            response = shown.strip()
        else:
            response, _ = engine.chat(query, history)
            print(response, file=stdout, flush=True)
        return [*history, (query, response)]


def prediction_items(file: str | Path, fmt: str = "auto") -> Iterable[dict]:
    """Each turn of each dialogue as (query, history, system, reference)."""
    from glmtune.data.readers import iter_dialogues

    for dialogue in iter_dialogues(file, format=fmt):
        for i, (query, answer) in enumerate(dialogue.turns):
            yield {
                "query": query,
                "history": list(dialogue.turns[:i]),
                "system": dialogue.system,
                "reference": answer,
                "source": dialogue.source,
            }


def score(results: list[dict]) -> dict:
    """Exact match over all rows (at least one); ROUGE-1/2/L and BLEU-4 over the rows that have a reference."""
    from glmtune import metrics

    exact = sum(r["prediction"].strip() == r["reference"].strip() for r in results)
    summary: dict = {"samples": len(results), "exact_match": exact / len(results), "exact_match_count": exact}
    scored = [r for r in results if r["reference"].strip()]
    if scored:
        missing = metrics.missing_packages()
        if missing:
            summary["metrics_missing"] = missing
        else:
            summary.update(
                metrics.text_metrics([r["prediction"] for r in scored], [r["reference"] for r in scored])
            )
            summary["scored_samples"] = len(scored)
    return summary


def predict(
    engine: ChatEngine,
    file: str | Path,
    *,
    out: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    fmt: str = "auto",
    show: bool = True,
) -> dict:
    """Answer every turn of a data file in batches; print and save ROUGE/BLEU and exact match.

    With `out`, the predictions go to OUT (JSON lines) and the scores to OUT with suffix .metrics.json. The
    last line printed is always `exact match: K/N` (scripts read it).
    """
    from glmtune import metrics

    items = list(prediction_items(resolve_path(file), fmt))
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ValueError(f"--predict {file}: no dialogue turns to answer")
    results = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        completions = engine.batch_complete(
            [c["query"] for c in chunk], [c["history"] for c in chunk], [c["system"] for c in chunk]
        )
        for item, completion in zip(chunk, completions, strict=True):
            results.append({**item, "prediction": completion.text})
            if show:
                print(
                    f"Q: {item['query']}\n   expected: {item['reference']}\n   model:    {completion.text}",
                    flush=True,
                )
    summary = score(results)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for r in results:
                f.write(
                    json.dumps({**r, "history": [list(h) for h in r["history"]]}, ensure_ascii=False) + "\n"
                )
        tmp.replace(out)
        metrics_file = out.with_suffix(".metrics.json")
        metrics_file.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if show:
        if "metrics_missing" in summary:
            print(
                f"ROUGE/BLEU skipped: pip install 'glmtune[eval]' (missing: {', '.join(summary['metrics_missing'])})"
            )
        elif "bleu-4" in summary:
            print(
                f"{metrics.format_metrics(summary)}  ({summary['scored_samples']} answers with a reference)"
            )
        if out:
            print(f"predictions written to {out}, scores to {metrics_file}")
        print(f"exact match: {summary['exact_match_count']}/{len(results)}", flush=True)
    return summary
