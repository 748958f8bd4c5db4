"""A stand-in model that answers with scripted ids, for testing what surrounds generation (prompts, parsing,
serving) with answers a tuned model would give."""

from __future__ import annotations

import torch


class ScriptedModel(torch.nn.Module):
    """Answers each generate() with the next scripted ids; keeps the prompts it got."""

    def __init__(self, answers: list[list[int]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # the engine asks the parameters for the device
        self.config = type("Config", (), {"seq_length": 4096})()
        self.answers = list(answers)
        self.prompts: list[list[int]] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, streamer=None, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            self.prompts.append(ids[mask.bool()].tolist())
            rows.append(self.answers.pop(0)[:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], dtype=input_ids.dtype)
        if streamer is not None:
            assert len(rows) == 1, "a streamer takes one row"
            streamer.put(input_ids)
            for token in new[0]:
                streamer.put(token.view(1, 1))
            streamer.end()
        return torch.cat([input_ids, new], dim=1)
