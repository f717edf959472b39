"""``hmtconv train`` and the CLI's error contract: one ``hmtconv: error: ...`` line, exit status 2."""
import subprocess
import sys

import pytest
import torch

from hmtconv.cli import main


def test_train_writes_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "m.pt"
    argv = ["train", "--epochs", "1", "--limit", "2", "--batch-size", "16", "--device", "cpu", "--no-progress"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["meta"]["config"]["limit"] == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "nope"], "hmtconv: error: unknown dataset 'nope'"),
        (["train", "--dataset", "cifar10"], "hmtconv: error: dataset 'cifar10' needs --data-root"),
        (["train", "--dataset", "mnist", "--model", "vit_small", "--epochs", "0"], "hmtconv: error: epochs must be"),
        (["train", "--epochs", "x"], "hmtconv train: error: argument --epochs: invalid int value: 'x'"),
        (["train", "--model", "nope"], "hmtconv train: error: argument --model: invalid choice: 'nope'"),
        ([], "hmtconv: error: the following arguments are required: COMMAND"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(argv, message, capsys):
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_python_dash_m_and_help_show_defaults():
    result = subprocess.run([sys.executable, "-m", "hmtconv", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--batch-size BATCH_SIZE" in result.stdout and "(default: 128)" in result.stdout
