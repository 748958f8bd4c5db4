"""A user's mistakes with the inference scripts end in one `error:` line naming the path or flag, exit code 1.

Each case runs the script's main() in this process (fast) and checks that nothing was loaded or written
first; a few also run as subprocesses, as a user runs them, to show the exit code and that no traceback
reaches the terminal.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from glmtune.inference.cli import exits_on_user_error
from tests.conftest import REPO_ROOT

DATA = str(REPO_ROOT / "data" / "dev.json")


def script_main(script: str) -> Callable[[list[str]], int]:
    """The main() a script runs, taking argv."""
    from glmtune.inference.cli import inference_main

    if script == "infer.py":
        from glmtune.inference.artifacts import load_base

        return lambda argv: inference_main("infer", load_base, argv, with_checkpoint=False)
    if script == "infer_finetuning.py":
        from glmtune.inference.artifacts import load_finetuned

        return lambda argv: inference_main("infer_finetuning", load_finetuned, argv)
    if script == "infer_lora_finetuning.py":
        from infer_lora_finetuning import main

        return main
    pytest.importorskip("uvicorn")
    from glmtune.serving.launch import main

    return lambda argv: main("infer_api", argv)


def write_run(folder: Path, **config) -> Path:
    """A folder that looks like a training artifact: only its hyperparameters.yaml."""
    folder.mkdir(parents=True)
    (folder / "hyperparameters.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    lora = write_run(tmp_path / "lora", method="lora", model={"path": str(tmp_path / "gone")})
    (lora / "adapter_config.json").write_text("{}")
    no_adapter = write_run(tmp_path / "no_adapter", method="ia3", model={"path": str(tmp_path / "gone")})
    full = write_run(tmp_path / "fullrun", method="full", model={"path": str(tmp_path / "gone")})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "hyperparameters.yaml").write_text("method: [lora\n")
    return {
        "missing": str(tmp_path / "missing"),
        "empty": str(tmp_path / "empty"),
        "file": str(tmp_path / "file.txt"),
        "full": str(tmp_path / "full"),
        "lora": str(lora),
        "fullrun": str(full),
        "broken": str(broken),
        "no_adapter": str(no_adapter),
        "gone": str(tmp_path / "gone"),
        "tmp": str(tmp_path),
    }


# (script, flags with {placeholders} from `paths`, what the error line must say)
CASES = [
    ("infer_lora_finetuning.py", ["--checkpoint", "{missing}"], "{missing}: no such folder"),
    ("infer_finetuning.py", ["--checkpoint", "{empty}"], "{empty}: no hyperparameters.yaml"),
    ("infer_lora_finetuning.py", ["--checkpoint", "{file}"], "{file}: a file, not a training artifact"),
    ("infer_api.py", ["--checkpoint", "{empty}"], "{empty}: no hyperparameters.yaml"),
    ("infer_lora_finetuning.py", ["--checkpoint", "{broken}"], "hyperparameters.yaml:2: not valid YAML"),
    ("infer_finetuning.py", ["--checkpoint", "{lora}"], "{lora} holds a lora adapter: use infer_lora"),
    ("infer_lora_finetuning.py", ["--checkpoint", "{fullrun}"], "not an adapter: use infer_finetuning.py"),
    ("infer_lora_finetuning.py", ["--checkpoint", "{lora}"], "model.path {gone} (the base model"),
    ("infer_lora_finetuning.py", ["--checkpoint", "{no_adapter}"], "{no_adapter}: no adapter_config.json"),
    ("infer.py", ["--model.path", "{lora}"], "a lora training result, not a model: python infer_lora"),
    ("infer_api.py", ["--checkpoint", "{lora}", "--model_kind", "base"], "--model_kind base serves"),
    (
        "infer_lora_finetuning.py",
        ["--train.output_dir", "{missing}"],
        "no --checkpoint given, and {missing}/final (<train.output_dir>/final) does not exist",
    ),
    ("infer.py", ["--predict", "{missing}"], "--predict {missing}: no such file"),
    ("infer.py", ["--predict", "{empty}"], "--predict {empty}: a folder, not a data file"),
    ("infer_lora_finetuning.py", ["--checkpoint", "{lora}", "--predict", "{missing}"], "--predict {missing}"),
    ("infer.py", ["--predict", DATA, "--out", "{empty}"], "--out {empty}: a folder"),
    ("infer.py", ["--out", "{tmp}/p.jsonl"], "--out applies to --predict only"),
    ("infer_finetuning.py", ["--limit", "3"], "--limit applies to --predict only"),
    ("infer.py", ["--predict", DATA, "--batch_size", "0"], "--batch_size 0: must be at least 1"),
    ("infer.py", ["--predict", DATA, "--stream"], "--stream applies to the terminal chat"),
    ("infer.py", ["--stream", "--generation.num_beams", "2"], "--stream needs generation.num_beams 1"),
    ("infer.py", ["--device", "gpu0"], "--device gpu0: not a device"),
    (
        "infer_lora_finetuning.py",
        ["--checkpoint", "{lora}", "--merge", "{full}"],
        "--merge {full}: folder exists",
    ),
    ("infer_lora_finetuning.py", ["--checkpoint", "{lora}", "--merge", "{file}"], "--merge {file}: a file"),
    (
        "infer_lora_finetuning.py",
        ["--checkpoint", "{lora}", "--merge", "{tmp}/new", "--predict", DATA],
        "--merge writes a model folder",
    ),
    (
        "infer_lora_finetuning.py",
        ["--checkpoint", "{lora}", "--merge", "{tmp}/new", "--model.quantization", "nf4"],
        "--merge adds the adapter to float weights, not model.quantization=nf4",
    ),
    (
        "infer.py",
        ["--model.quantization", "nf4", "--model.quantization_bit", "4"],
        "model.quantization_bit and model.quantization (bitsandbytes) exclude each other",
    ),
]


def only_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize(("script", "flags", "expected"), CASES, ids=[f"{c[0]}:{c[2][:40]}" for c in CASES])
def test_user_mistake_is_one_error_line(script, flags, expected, paths, capsys):
    main = script_main(script)
    assert main([flag.format(**paths) for flag in flags]) == 1
    assert expected.format(**paths) in only_error_line(capsys.readouterr().err)
    assert not (Path(paths["tmp"]) / "new").exists() and not (Path(paths["tmp"]) / "p.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA")
def test_cuda_device_without_cuda_is_refused(paths, capsys):
    assert script_main("infer.py")(["--device", "cuda"]) == 1
    assert "--device cuda: no CUDA device is visible here" in only_error_line(capsys.readouterr().err)


def test_api_port_in_use_is_refused_before_loading(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert script_main("infer_api.py")(["--port", port, "--model.path", "no/such/model"]) == 1
    assert f"--port {port}: cannot listen there" in only_error_line(capsys.readouterr().err)


def test_api_web_chat_without_gradio_is_refused(monkeypatch, capsys):
    main = script_main("infer_api.py")
    monkeypatch.setitem(sys.modules, "gradio", None)  # what a missing package looks like to `import`
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    assert main(["--ui", "--port", port, "--model.path", "no/such/model"]) == 1
    assert "the web chat (--ui) needs gradio" in only_error_line(capsys.readouterr().err)


def run(script: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *flags], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("script", "flags", "expected"),
    [
        (
            "infer_lora_finetuning.py",
            ["--checkpoint", "{empty}", "--predict", DATA],
            "no hyperparameters.yaml",
        ),
        ("infer.py", ["--predict", "{empty}"], "a folder, not a data file"),
    ],
)
def test_scripts_exit_1_without_a_traceback(script, flags, expected, paths):
    result = run(script, *(flag.format(**paths) for flag in flags))
    assert result.returncode == 1, result.stderr
    assert expected in only_error_line(result.stderr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA")
@pytest.mark.parametrize("mode", ["nf4", "bnb8"])
def test_bitsandbytes_quantization_at_inference_needs_cuda(mode):
    """The key is read at inference: without CUDA it is refused, not silently loaded in float."""
    result = run("infer.py", "--model.quantization", mode, "--predict", DATA, "--limit", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"model.quantization={mode} needs a CUDA GPU" in only_error_line(result.stderr)
    assert "exact match" not in result.stdout  # nothing was answered with float weights


def test_a_bug_is_not_turned_into_an_error_line():
    @exits_on_user_error
    def broken() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        broken()


def test_a_checkpoint_that_cannot_load_as_asked_is_an_error_line(reference_dir, tmp_path, capsys):
    """Wrong family for the folder, and a truncated weight file: the loader's errors name the file."""
    main = script_main("infer.py")
    chatglm2 = str(reference_dir / "chatglm2-6b-tiny")
    assert main(["--model.path", chatglm2, "--model.family", "chatglm", "--predict", DATA]) == 1
    assert "is a chatglm2 config" in only_error_line(capsys.readouterr().err)

    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(chatglm2, truncated, ignore=shutil.ignore_patterns("golden.pt"))
    weights = sorted(truncated.glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["--model.path", str(truncated), "--predict", DATA]) == 1
    assert f"{weights.name}" in only_error_line(capsys.readouterr().err)
