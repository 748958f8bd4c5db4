"""`make demo` end to end, as a new user runs it: records, LoRA training, then chat on training questions."""

import re
import subprocess
import sys

import pytest

from glmtune.config import build_parser, parse_args
from glmtune.demo.tiny import build_tiny_chatglm2
from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_demo_memorises_the_training_answers(tmp_path):
    out = tmp_path / "out"
    # The scripts build the embedded default only in its own folder (output/tiny-chatglm2 of the checkout);
    # build the same model here so this test leaves the checkout alone.
    default_cfg, _ = parse_args(build_parser("demo"), [])
    build_tiny_chatglm2(out / "tiny", default_cfg.model.tiny)
    flags = [
        "--model.path",
        str(out / "tiny"),
        "--data.output_dir",
        str(out / "records"),
        "--train.output_dir",
        str(out / "run"),
    ]

    def run(*args):
        result = subprocess.run(
            [sys.executable, *args, *flags], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return result.stdout

    assert re.search(r"records: \d+ train", run("data_utils.py"))
    run("train.py")
    assert (out / "run" / "final" / "adapter_config.json").is_file()
    answers = run("infer_lora_finetuning.py", "--predict", "data/dev.json", "--limit", "8")
    last = answers.strip().splitlines()[-1]
    match = re.fullmatch(r"exact match: (\d+)/(\d+)", last)
    assert match, last
    k, n = map(int, match.groups())
    assert n >= 5 and k / n >= 0.8, answers
