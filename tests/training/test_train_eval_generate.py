"""train.eval_generate: the eval loop's generation metrics are those of the trained model's own answers."""

from glmtune.inference.artifacts import load_lora
from glmtune.inference.metrics import text_metrics
from glmtune.inference.predict import prediction_items
from glmtune.training.trainer import train
from tests.training.conftest import make_cfg


def test_eval_generate_logs_the_metrics_of_the_trained_models_answers(tiny_chatglm2, tiny_data, tmp_path):
    cfg = make_cfg(tiny_chatglm2, tiny_data, tmp_path / "run", max_epochs=1, eval_generate=3)
    cfg.generation.max_new_tokens = 8
    logged = train(cfg).metrics

    # Score the saved adapter's answers independently: the last evaluation saw the final weights.
    engine = load_lora(cfg, tmp_path / "run" / "final")
    items = list(prediction_items(tiny_data["dev"]))[:3]
    answers = engine.batch_chat([i["query"] for i in items], [i["history"] for i in items])
    references = [i["reference"] for i in items]
    expected = {
        **text_metrics(answers, references),
        "exact_match": sum(a.strip() == r.strip() for a, r in zip(answers, references)) / 3,
    }
    for key, value in expected.items():
        assert abs(logged[f"val_{key}"] - value) < 1e-4, (key, logged)
