"""Terminal chat: history, clear / exit, streaming, stop strings and every generation setting."""

from __future__ import annotations

import dataclasses
import io
from types import SimpleNamespace

import pytest
import torch

from glmtune.config import GenerationArgs
from glmtune.inference.chat import fit_history, terminal_chat
from glmtune.inference.engine import cut_at_stop, held_back
from tests.inference.conftest import run_script

Q1, Q2, Q3 = "山间茶舍几点开门？", "绿茶用多少度的水冲泡？", "「画蛇添足」是什么意思？"


def with_generation(engine, **settings):
    """The same model and tokenizer with other generation.* settings."""
    return dataclasses.replace(engine, generation=GenerationArgs(**{"max_new_tokens": 24, **settings}))


def answers(output: str) -> list[str]:
    """The assistant lines of a terminal transcript, in order."""
    return [line.split("assistant: ", 1)[1] for line in output.splitlines() if "assistant: " in line]


def chat_through_stdin(engine, text: str, stream: bool = False) -> tuple[str, list]:
    out = io.StringIO()
    history = terminal_chat(engine, stream=stream, stdin=io.StringIO(text), stdout=out)
    return out.getvalue(), history


def test_history_clear_and_exit(base_engine):
    engine = with_generation(base_engine)
    a1, h1 = engine.chat(Q1)
    a2, _ = engine.chat(Q2, h1)
    alone = engine.chat(Q2)[0]
    assert a2 != alone, "the test needs a question whose answer depends on the history"

    output, history = chat_through_stdin(engine, f"{Q1}\n{Q2}\nclear\n{Q2}\nexit\n{Q3}\n")
    assert answers(output) == [a1, a2, alone]  # the second turn saw the first; after `clear`, nothing
    assert "(history cleared)" in output
    assert history == [(Q2, alone)]  # `exit` ended the chat before Q3


def test_stream_prints_the_same_answers(base_engine):
    engine = with_generation(base_engine)
    text = f"{Q1}\n\n{Q2}\n"  # an empty line is skipped; end of input ends the chat
    plain, plain_history = chat_through_stdin(engine, text)
    streamed, streamed_history = chat_through_stdin(engine, text, stream=True)
    assert answers(streamed) == answers(plain)
    assert streamed_history == plain_history
    assert len(plain_history) == 2


def stop_inside(text: str) -> str:
    """A two-character piece of `text` whose first occurrence is past its start (cutting there leaves text)."""
    for i in range(2, len(text) - 1):
        piece = text[i : i + 2]
        if piece.strip() and text.find(piece) == i:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_answer_and_are_not_shown(base_engine, stream):
    full = with_generation(base_engine).chat(Q1)[0]
    stop = stop_inside(full)
    cut = full[: full.find(stop)].strip()
    output, history = chat_through_stdin(with_generation(base_engine, stop=[stop]), f"{Q1}\n", stream=stream)
    assert answers(output) == [cut]
    assert stop not in output.split("assistant: ", 1)[1]
    assert history == [(Q1, cut)]


@pytest.mark.parametrize("stops", [["。", "！"], ["！", "。"], ["", "再见", "很好"]])
def test_cut_at_stop_cuts_at_the_earliest_stop_string(stops):
    """Whichever order the stop strings are listed in, the text ends before the first one that occurs."""
    text = "你好。很好！再见。"
    first = min(text.find(s) for s in stops if s)
    assert cut_at_stop(text, stops) == (text[:first], True)
    assert cut_at_stop(text, ["没有"]) == (text, False) and cut_at_stop(text, []) == (text, False)


def test_fit_history_drops_the_oldest_turns_first(base_engine):
    history = [(f"问题{i}", "回答" * (i + 1)) for i in range(4)]
    length = {k: len(base_engine.prompt_ids(Q1, history[k:])) for k in range(len(history) + 1)}

    def engine(context_length):
        generation = GenerationArgs(max_new_tokens=10)
        return SimpleNamespace(
            context_length=context_length, generation=generation, prompt_ids=base_engine.prompt_ids
        )

    assert fit_history(engine(length[2] + 10), Q1, history) == history[2:]  # the newest two turns fit
    assert fit_history(engine(length[0] + 10), Q1, history) == history  # everything fits: unchanged
    assert fit_history(engine(None), Q1, history) == history  # unknown context: unchanged
    assert fit_history(engine(length[4] + 10), Q1, history) == []
    with pytest.raises(ValueError, match="longer than the model's context"):
        fit_history(engine(length[4] + 9), Q1, history)


def test_held_back_keeps_possible_stop_starts():
    assert held_back("abc", ["cd"]) == 1
    assert held_back("abcd", ["cd"]) == 0  # a whole stop string is cut by the engine, not held back
    assert held_back("ab", ["xbz", "abq"]) == 2
    assert held_back("ab", []) == 0


def generated(engine, query: str, **kwargs) -> str:
    """What transformers' generate() itself answers with these arguments (the reference for the plumbing)."""
    batch = engine._batch([engine.prompt_ids(query)])
    out = engine.model.generate(
        **batch,
        eos_token_id=engine.template.stop_token_ids,
        pad_token_id=engine.tokenizer.pad_token_id,
        **kwargs,
    )
    kept, _ = engine._until_stop_token(out[0, batch["input_ids"].shape[1] :].tolist())
    return engine.tokenizer.decode(kept, skip_special_tokens=True).strip()


@pytest.mark.parametrize(
    "settings",
    [
        {"max_new_tokens": 5},
        {"num_beams": 3, "max_new_tokens": 12},
        {"repetition_penalty": 1.8, "max_new_tokens": 24},
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_new_tokens": 16},
    ],
)
def test_generation_settings_reach_generate(base_engine, settings):
    engine = with_generation(base_engine, **settings)
    torch.manual_seed(1)
    output, _ = chat_through_stdin(engine, f"{Q3}\n")
    torch.manual_seed(1)
    expected = generated(engine, Q3, **settings)
    assert answers(output) == [expected]


def test_settings_change_the_answer(base_engine):
    greedy = with_generation(base_engine).chat(Q3)[0]
    assert with_generation(base_engine, repetition_penalty=1.8).chat(Q3)[0] != greedy
    short = with_generation(base_engine, max_new_tokens=3)
    assert short.complete(Q3).completion_tokens <= 3
    # Sampling among the single most likely token is greedy decoding.
    assert with_generation(base_engine, do_sample=True, top_k=1, temperature=0.5).chat(Q3)[0] == greedy


@pytest.mark.slow
def test_infer_py_chat_through_stdin(tiny_model, base_engine):
    proc = run_script(
        "infer.py",
        "--model.path", str(tiny_model), "--generation.max_new_tokens", "20",
        stdin=f"{Q1}\n{Q2}\nclear\n{Q2}\nexit\n",
    )  # fmt: skip
    engine = with_generation(base_engine, max_new_tokens=20)
    a1, h1 = engine.chat(Q1)
    assert answers(proc.stdout) == [a1, engine.chat(Q2, h1)[0], engine.chat(Q2)[0]]
    assert "(history cleared)" in proc.stdout


@pytest.mark.slow
def test_infer_lora_streamed_chat_with_stop_string(lora_adapter):
    from glmtune.inference.artifacts import load_lora
    from tests.inference.conftest import task_config

    engine = load_lora(task_config("--generation.max_new_tokens", "20"), lora_adapter)
    a1, h1 = engine.chat(Q1)
    stop = stop_inside(engine.chat(Q2, h1)[0])
    proc = run_script(
        "infer_lora_finetuning.py",
        "--checkpoint", str(lora_adapter), "--stream", "--generation.max_new_tokens", "20",
        "--generation.stop", f'["{stop}"]',
        stdin=f"{Q1}\n{Q2}\n",
    )  # fmt: skip
    e1, h1 = engine.chat(Q1, stop=[stop])
    e2 = engine.chat(Q2, h1, stop=[stop])[0]
    assert answers(proc.stdout) == [e1, e2]
    assert stop not in e1 + e2
