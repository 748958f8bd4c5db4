"""POST /v1/score: a reward model served by infer_api.py scores candidate answers, each as the scorer scores
it alone; a reward server has no chat routes and no chat page."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from glmtune.serving.api import create_app  # noqa: E402
from glmtune.serving.score import MAX_ANSWERS  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402
from tests.serving.live_server import script_server  # noqa: E402

PROMPT = "山间茶舍几点开门？"
ANSWERS = ["每天早上九点开门。", "我不知道。", "晚上十点关门，早上九点开门。"]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A LoRA reward model on the tiny default, trained for a few steps (its scores need not be good)."""
    from glmtune.config import build_parser, parse_args
    from glmtune.training.trainer import train

    out = tmp_path_factory.mktemp("reward")
    flags = [
        "--config", str(REPO_ROOT / "config" / "reward.yaml"), "--train.output_dir", str(out / "run"),
        "--data.output_dir", str(out / "records"), "--train.max_steps", "2",
    ]  # fmt: skip
    cfg, _ = parse_args(build_parser("test"), flags)
    train(cfg, enable_progress_bar=False)
    return out / "run" / "final", flags


def test_score_equals_the_scorer_on_each_answer_alone(reward_run):
    from glmtune.config import build_parser, parse_args
    from glmtune.inference.reward import load_reward_scorer

    final, flags = reward_run
    scorer = load_reward_scorer(parse_args(build_parser("test"), flags)[0], final)
    api = TestClient(create_app(None, scorer=scorer, model_name="rm"), raise_server_exceptions=False)
    history = [["你好", "你好！"]]
    response = api.post("/v1/score", json={"prompt": PROMPT, "answers": ANSWERS, "history": history})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "rm"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    expected = [scorer.score(PROMPT, answer, [("你好", "你好！")]) for answer in ANSWERS]
    assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-4)
    assert len(set(expected)) == 3, "the answers should score differently"
    # no chat on a reward model; bad bodies name the field
    assert (
        api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).status_code
        == 404
    )
    empty = api.post("/v1/score", json={"prompt": PROMPT, "answers": []})
    assert empty.status_code == 400 and "answers" in empty.json()["error"]["message"]
    many = api.post("/v1/score", json={"prompt": PROMPT, "answers": ["a"] * (MAX_ANSWERS + 1)})
    assert many.status_code == 400


@pytest.mark.slow
def test_infer_api_serves_a_reward_checkpoint_and_refuses_its_chat_page(reward_run, capsys):
    import httpx

    from glmtune.serving.launch import main

    final, _ = reward_run
    assert main("test", ["--checkpoint", str(final), "--ui"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --ui:") and "reward model" in err
    with script_server("--checkpoint", str(final)) as live:
        scored = httpx.post(f"{live.url}/v1/score", json={"prompt": PROMPT, "answers": ANSWERS}, timeout=60)
        chat = httpx.post(f"{live.url}/", json={"prompt": PROMPT}, timeout=60)
    assert live.returncode == [0], live.output
    assert scored.status_code == 200 and len(scored.json()["data"]) == 3
    assert chat.status_code == 404
    assert "/v1/score (reward)" in live.output[0]
