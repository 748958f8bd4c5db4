"""POST /v1/score: a `stage: reward` model's scores for candidate answers to one prompt (ranking best-of-n
samples, filtering data). Served by infer_api.py when its --checkpoint is a reward result, in place of the
chat routes: a reward model scores answers and writes none.

    {"prompt": "...", "answers": ["...", "..."], "history": [["q", "a"]], "system": "..."}
    -> {"object": "list", "model": "...", "data": [{"index": 0, "score": 1.25}, ...]}

Each answer is rendered as training rendered it (the chat prompt, the answer, its end token) and scored in
batches; higher is better.
"""

from __future__ import annotations

import threading
from typing import Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from glmtune.inference.reward import RewardScorer
from glmtune.serving.limits import AdmissionGate
from glmtune.serving.schemas import Text

# One request's answers go through the model together: bounded like a batch of chat requests.
MAX_ANSWERS = 64


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # any name is accepted: the server holds one model
    prompt: Text
    answers: list[Text] = Field(min_length=1, max_length=MAX_ANSWERS)
    history: list[tuple[Text, Text]] | None = None
    system: Text | None = None


class Score(BaseModel):
    index: int
    score: float


class ScoreResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Score]


def add_score_route(
    app: FastAPI, scorer: RewardScorer, model_name: str, gate: AdmissionGate, responses: dict
) -> None:
    """POST /v1/score on `scorer`; one forward at a time (the model is not safe to run concurrently)."""
    lock = threading.Lock()

    def score(body: ScoreRequest) -> list[float]:
        rows = len(body.answers)
        with lock:
            return scorer.score_pairs(
                [body.prompt] * rows, body.answers, [body.history] * rows, [body.system] * rows
            )

    @app.post("/v1/score", response_model=ScoreResponse, responses=responses)
    async def score_answers(body: ScoreRequest) -> ScoreResponse:
        """The reward of each answer to the prompt (after `history`, under `system`); higher is better."""
        gate.enter()
        try:
            scores = await run_in_threadpool(score, body)
        finally:
            gate.leave()
        return ScoreResponse(model=model_name, data=[Score(index=i, score=s) for i, s in enumerate(scores)])
