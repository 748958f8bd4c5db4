"""Answering every turn of a data file (`--predict`) and scoring the answers against the data's references."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from glmtune.config import ConfigError, resolve_path
from glmtune.data.readers import iter_dialogues
from glmtune.inference import metrics
from glmtune.inference.engine import ChatEngine
from glmtune.tokenizers.tool_prompts import answer_text, offered_tool_names


def tool_items(messages: list[dict], source: str) -> Iterable[dict]:
    """Each supervised assistant message of a tool-call dialogue (a text answer or a call, written as the
    model writes it: the tool's name line, then the arguments), with the messages before it."""
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("loss", True) is False:
            continue
        metadata = message.get("metadata")
        yield {
            "query": next(m["content"] for m in reversed(messages[:k]) if m["role"] != "assistant"),
            "messages": messages[:k],
            "reference": f"{metadata}\n{message['content']}" if metadata else message["content"],
            "source": source,
        }


def prediction_items(file: str | Path, fmt: str = "auto") -> Iterable[dict]:
    """Each turn of each dialogue as (query, history, system, reference); a tool-call dialogue's answers as
    (messages, reference)."""
    for dialogue in iter_dialogues(file, format=fmt):
        if "messages" in dialogue.meta:
            yield from tool_items(dialogue.meta["messages"], dialogue.source)
            continue
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


def check_predict_paths(file: str | Path, out: str | Path | None = None) -> None:
    """Refuse a `--predict` file that is not one, or an `--out` that is a folder, before a model loads."""
    path = resolve_path(file)
    if not path.exists():
        raise ConfigError(f"--predict {file}: no such file")
    if not path.is_file():
        raise ConfigError(f"--predict {file}: a folder, not a data file")
    if out is not None and Path(out).is_dir():
        raise ConfigError(f"--out {out}: a folder; name the file to write the predictions (JSON lines) to")


def write_results(out: Path, rows: list[dict], summary: dict) -> Path:
    """The rows to OUT (JSON lines, written whole or not at all) and the summary to OUT with suffix
    .metrics.json, which is returned."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    metrics_file = out.with_suffix(".metrics.json")
    metrics_file.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return metrics_file


def history_lists(result: dict) -> dict:
    """The history as JSON lists ([query, answer]), where the item has one."""
    return {"history": [list(h) for h in result["history"]]} if "history" in result else {}


def item_prompt(engine: ChatEngine, item: dict, file: str | Path) -> list[int]:
    if "messages" not in item:
        return engine.prompt_ids(item["query"], item["history"], item["system"])
    try:
        return engine.messages_prompt_ids(item["messages"])
    except ValueError as err:  # a template without tool calls, GLM-4 given ChatGLM3-style tools, ...
        raise ConfigError(f"--predict {file}: {item['source']}: {err}") from err


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
    check_predict_paths(file, out)
    items = list(prediction_items(resolve_path(file), fmt))
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ConfigError(f"--predict {file}: no dialogue turns to answer")
    results = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        completions = engine.complete_prompts([item_prompt(engine, item, file) for item in chunk])
        for item, completion in zip(chunk, completions, strict=True):
            prediction = completion.text
            if "messages" in item:  # a call is compared as a call, whatever its spacing
                names = offered_tool_names(item["messages"])
                prediction = answer_text(engine.tokenizer, prediction, names)
                item = {**item, "reference": answer_text(engine.tokenizer, item["reference"], names)}
            results.append({**item, "prediction": prediction})
            if show:
                print(
                    f"Q: {item['query']}\n   expected: {item['reference']}\n   model:    {completion.text}",
                    flush=True,
                )
    summary = score(results)
    if out:
        metrics_file = write_results(Path(out), [{**r, **history_lists(r)} for r in results], summary)
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
