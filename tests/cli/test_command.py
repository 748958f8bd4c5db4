"""`glmtune COMMAND ...`: the scripts' parsers and mains under one console command."""

import importlib.util
import sys

import pytest

import glmtune.command as command
from glmtune.training.module import NonFiniteLossError
from tests.conftest import REPO_ROOT


def script_main(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    ("name", "script"),
    [("data", "data_utils"), ("merge", "infer_lora_finetuning"), ("serve", "infer_api")],
)
def test_the_scripts_run_the_commands_mains(name: str, script: str) -> None:
    assert script_main(script) is command.COMMANDS[name][1]


@pytest.mark.parametrize(
    ("argv", "own_flag"),
    [
        (["data"], "--inspect"),
        (["train"], "--train.max_steps"),
        (["chat"], "--checkpoint"),
        (["predict"], "--limit"),
        (["merge"], "--merge"),
    ],
)
def test_each_command_takes_every_config_key(argv, own_flag, capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        command.main([*argv, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--data.max_seq_length" in out and own_flag in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bogus"], "error: unknown command 'bogus': choose one of data, train, chat, predict, merge, serve"),
        (
            ["predict", "--limit", "2"],
            "error: glmtune predict: name the file first (glmtune predict FILE ...)",
        ),
        (["merge"], "error: glmtune merge: name the out first (glmtune merge OUT ...)"),
        (["data", "--inspect", "-1"], "error: --inspect: a number of samples >= 0, not -1"),
    ],
)
def test_a_wrong_command_line_is_one_error_line(argv, message, capsys) -> None:
    assert command.main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == message


def test_without_a_command_the_usage_lists_them(capsys) -> None:
    assert command.main([]) == 1
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in command.COMMANDS)


def test_predict_and_merge_take_their_target_first() -> None:
    assert command.COMMANDS["predict"][2](["data/dev.json", "--limit", "2"]) == [
        "--predict",
        "data/dev.json",
        "--limit",
        "2",
    ]
    assert command.COMMANDS["merge"][2](["--merge", "out"]) == ["--merge", "out"]


def test_a_run_stopped_by_non_finite_losses_is_an_error_line(monkeypatch, capsys) -> None:
    def diverging(cfg, module_cls):
        raise NonFiniteLossError("loss is nan on 10 micro-batches in a row")

    monkeypatch.setattr(command, "train", diverging)
    assert command.main(["train"]) == 1
    assert capsys.readouterr().err.strip() == "error: loss is nan on 10 micro-batches in a row"


def test_serving_without_its_extra_says_what_to_install(monkeypatch, capsys) -> None:
    for name in [m for m in sys.modules if m.startswith("glmtune.serving")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    assert command.main(["serve"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: serving needs the package 'fastapi': install the serve extra"), err


def test_train_py_trains_with_models_py_s_loss(monkeypatch, capsys) -> None:
    trained_with = []

    def fake_train(cfg, module_cls):
        trained_with.append(module_cls)
        raise NonFiniteLossError("stop here")

    monkeypatch.setattr(command, "train", fake_train)
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from models import ChatModel

    assert script_main("train")([]) == 1
    assert command.main(["train"]) == 1
    assert trained_with == [ChatModel, command.CausalLMModule]
