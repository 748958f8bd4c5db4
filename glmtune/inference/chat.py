"""The terminal chat: multi-turn with history, `clear` and `exit`, streamed or not, and fitting the context."""

from __future__ import annotations

import sys
from typing import TextIO

from glmtune.inference.engine import ChatEngine, History, held_back

COMMANDS_HELP = "commands: 'clear' starts a new conversation, 'exit' quits"


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
