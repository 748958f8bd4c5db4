"""What the three inference scripts share: loading base / fine-tuned / LoRA models, terminal chat, prediction.

A training run's artifact folder holds `hyperparameters.yaml` (the resolved task config), so inference reads
the method, base model and template from there instead of asking the user to retype them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import TextIO
from pathlib import Path

import torch
import yaml

from glmtune.config import TaskConfig, resolve_path
from glmtune.generation import ChatEngine

COMMANDS_HELP = "commands: 'clear' starts a new conversation, 'exit' quits"


def read_run_config(artifact_dir: str | Path) -> dict:
    path = Path(artifact_dir) / "hyperparameters.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{artifact_dir}: no hyperparameters.yaml (is this a glmtune training output?)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _engine(model: torch.nn.Module, model_path: str | Path, cfg: TaskConfig) -> ChatEngine:
    from glmtune.data.prepare import model_family, template_name
    from glmtune.models.loading import load_tokenizer
    from glmtune.tokenizers.prompts import get_template

    family = model_family(cfg)
    tokenizer = load_tokenizer(model_path, family=family)
    template = get_template(template_name(cfg, family), tokenizer)
    model.eval()
    return ChatEngine(model=model, tokenizer=tokenizer, template=template, generation=cfg.generation)


def load_base(cfg: TaskConfig, device: str | None = None) -> ChatEngine:
    """infer.py: the base model as configured."""
    from glmtune.models.loading import load_model
    from glmtune.models.tiny import ensure_model

    path = ensure_model(cfg.model.path, cfg.model.tiny)
    model = load_model(path, torch_dtype=cfg.model.dtype, quantization_bit=cfg.model.quantization_bit,
                       family=cfg.model.family, device=device)
    return _engine(model, path, cfg)


def default_artifact(cfg: TaskConfig) -> Path:
    return resolve_path(cfg.train.output_dir) / "final"


def load_finetuned(cfg: TaskConfig, artifact_dir: str | Path | None = None, device: str | None = None) -> ChatEngine:
    """infer_finetuning.py: a `full`/`freeze` model folder, or base + a P-Tuning v2 prefix."""
    from glmtune.models.loading import load_model

    artifact = Path(artifact_dir) if artifact_dir else default_artifact(cfg)
    run = read_run_config(artifact)
    method = run.get("method")
    if method in ("full", "freeze"):
        model = load_model(artifact, torch_dtype=cfg.model.dtype, quantization_bit=cfg.model.quantization_bit,
                           device=device)
        return _engine(model, artifact, cfg)
    if method == "ptv2":
        base = resolve_path(run["model"]["path"])
        model = load_model(base, torch_dtype=cfg.model.dtype, quantization_bit=cfg.model.quantization_bit,
                           pre_seq_len=run["ptv2"]["pre_seq_len"], prefix_projection=run["ptv2"]["prefix_projection"],
                           ptuning_checkpoint=artifact, device=device)
        return _engine(model, base, cfg)
    raise ValueError(f"{artifact} was trained with method {method!r}: use infer_lora_finetuning.py for adapters")


def load_lora(cfg: TaskConfig, adapter_dir: str | Path | None = None, device: str | None = None) -> ChatEngine:
    """infer_lora_finetuning.py: base + PEFT adapter (LoRA, AdaLoRA, IA3)."""
    from peft import PeftModel

    from glmtune.models import quantization
    from glmtune.models.loading import load_model

    adapter = Path(adapter_dir) if adapter_dir else default_artifact(cfg)
    run = read_run_config(adapter)
    if run.get("method") not in ("lora", "adalora", "ia3"):
        raise ValueError(f"{adapter} holds a {run.get('method')!r} result, not an adapter: use infer_finetuning.py")
    base = resolve_path(run["model"]["path"])
    model = load_model(base, torch_dtype=cfg.model.dtype, quantization_bit=cfg.model.quantization_bit,
                       family=run["model"].get("family", "auto"), device=device)
    family = model.glmtune_family
    quantization.register_with_peft()
    model = PeftModel.from_pretrained(model, str(adapter))
    model.glmtune_family = family
    return _engine(model, base, cfg)


def terminal_chat(engine: ChatEngine, stream: bool = False, stdin: TextIO | None = None,
                  stdout: TextIO | None = None) -> None:
    """A multi-turn chat on stdin/stdout with history, `clear` and `exit`."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    history: list[tuple[str, str]] = []
    print(f"glmtune chat ({COMMANDS_HELP})", file=stdout, flush=True)
    while True:
        print("\nuser: ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        query = line.strip()
        if not query:
            continue
        if query == "exit":
            break
        if query == "clear":
            history = []
            print("(history cleared)", file=stdout, flush=True)
            continue
        print("assistant: ", end="", file=stdout, flush=True)
        if stream:
            shown = ""
            for shown_now in engine.stream_chat(query, history):
                print(shown_now[len(shown):], end="", file=stdout, flush=True)
                shown = shown_now
            response = shown.strip()
            print(file=stdout, flush=True)
        else:
            response, _ = engine.chat(query, history)
            print(response, file=stdout, flush=True)
        history.append((query, response))


def prediction_items(file: str | Path, fmt: str = "auto") -> Iterable[dict]:
    """Each turn of each dialogue as (query, history, reference)."""
    from glmtune.data.readers import iter_dialogues

    for dialogue in iter_dialogues(file, format=fmt):
        for i, (query, answer) in enumerate(dialogue.turns):
            yield {"query": query, "history": list(dialogue.turns[:i]), "reference": answer,
                   "source": dialogue.source}


def predict(engine: ChatEngine, file: str | Path, *, out: str | Path | None = None, limit: int | None = None,
            batch_size: int = 8, fmt: str = "auto", show: bool = True) -> dict:
    """Answer every turn of a data file in batches; print and save exact match (and metrics where installed)."""
    items = list(prediction_items(resolve_path(file), fmt))[: limit or None]
    results = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        answers = engine.batch_chat([c["query"] for c in chunk], [c["history"] for c in chunk])
        for item, answer in zip(chunk, answers, strict=True):
            results.append({**item, "prediction": answer})
            if show:
                print(f"Q: {item['query']}\n   expected: {item['reference']}\n   model:    {answer}", flush=True)
    exact = sum(r["prediction"].strip() == r["reference"].strip() for r in results)
    summary = {"samples": len(results), "exact_match": exact / max(len(results), 1)}
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps({**r, "history": [list(h) for h in r["history"]]}, ensure_ascii=False) + "\n")
        tmp.replace(out)
        out.with_suffix(".metrics.json").write_text(json.dumps(summary, indent=2))
    if show:
        print(f"exact match: {exact}/{len(results)}", flush=True)
    return summary
