"""Chat with a model: the family's prompt template, transformers' generate(), stop strings, streaming.

Every front end (terminal chat, batch prediction, HTTP API, web page, Python API) goes through `ChatEngine`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from glmtune.config import GenerationArgs

History = list[tuple[str, str]]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass
class ChatEngine:
    model: torch.nn.Module
    tokenizer: object
    template: object
    generation: GenerationArgs = field(default_factory=GenerationArgs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generate_kwargs(self, overrides: dict) -> dict:
        g = {**self.generation.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
        kwargs = dict(
            max_new_tokens=g["max_new_tokens"],
            do_sample=g["do_sample"],
            num_beams=g["num_beams"],
            repetition_penalty=g["repetition_penalty"],
            eos_token_id=self.template.stop_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if g["do_sample"]:
            kwargs.update(temperature=g["temperature"], top_p=g["top_p"], top_k=g["top_k"])
        return kwargs

    def prompt_ids(self, query: str, history: History | None = None) -> list[int]:
        return list(self.template.build_chat_prompt(query, history or []).input_ids)

    def _batch(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left-pad prompts so every row's answer starts at the same column."""
        longest = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, longest - len(p) :] = torch.tensor(p)
            mask[row, longest - len(p) :] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _decode(self, ids: Sequence[int]) -> str:
        stops = set(self.template.stop_token_ids)
        kept = []
        for i in ids:
            if i in stops:
                break
            kept.append(int(i))
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    @torch.inference_mode()
    def batch_chat(self, queries: list[str], histories: list[History] | None = None, **overrides) -> list[str]:
        histories = histories or [[] for _ in queries]
        prompts = [self.prompt_ids(q, h) for q, h in zip(queries, histories, strict=True)]
        batch = self._batch(prompts)
        out = self.model.generate(**batch, **self._generate_kwargs(overrides))
        new = out[:, batch["input_ids"].shape[1] :]
        stops = overrides.get("stop") or self.generation.stop
        return [cut_at_stop(self._decode(row.tolist()), stops)[0].strip() for row in new]

    def chat(self, query: str, history: History | None = None, **overrides) -> tuple[str, History]:
        response = self.batch_chat([query], [history or []], **overrides)[0]
        return response, [*(history or []), (query, response)]

    def stream_chat(self, query: str, history: History | None = None, **overrides) -> Iterator[str]:
        """Yield the answer so far, growing, as tokens arrive (what a terminal or SSE client shows)."""
        from transformers import TextIteratorStreamer

        batch = self._batch([self.prompt_ids(query, history)])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**batch, **self._generate_kwargs(overrides), "streamer": streamer}
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as err:  # re-raised in the caller's thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        stops = overrides.get("stop") or self.generation.stop
        text = ""
        for piece in streamer:
            text += piece
            shown, stopped = cut_at_stop(text, stops)
            yield shown
            if stopped:
                break
        thread.join()
        if errors:
            raise errors[0]
