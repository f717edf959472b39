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


def test_loader_processes_train_the_same_model(tmp_path, capsys):
    argv = ["train", "--epochs", "1", "--limit", "2", "--batch-size", "16", "--device", "cpu", "--no-progress"]
    saved = []
    for workers in ("0", "1"):
        assert main(argv + ["--workers", workers, "--out", str(tmp_path / f"{workers}.pt")]) == 0
        saved.append(torch.load(tmp_path / f"{workers}.pt", weights_only=True))
    assert saved[0]["meta"]["config"] == saved[1]["meta"]["config"] and "workers" not in saved[0]["meta"]["config"]
    for key, value in saved[0]["state_dict"].items():
        assert torch.equal(value, saved[1]["state_dict"][key]), key


def test_train_with_model_args_loads_back_as_that_variant(tmp_path, capsys):
    """--model-arg reaches the builder and the checkpoint, so --model PATH rebuilds the variant."""
    from hmtconv.models import load_model
    out = tmp_path / "v.pt"
    argv = ["train", "--model", "vit_small", "--model-arg", "patch_size=7", "--model-arg", "num_layers=1",
            "--model-arg", "hidden_dim=16", "--epochs", "1", "--limit", "1", "--batch-size", "8", "--device", "cpu",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    vit = load_model(str(out), in_channels=1, image_size=28, num_classes=10).model.net
    assert vit.patch_size == 7 and len(vit.encoder.layers) == 1 and vit.hidden_dim == 16


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "nope"], "hmtconv: error: unknown dataset 'nope'"),
        (["train", "--dataset", "cifar10"], "hmtconv: error: dataset 'cifar10' needs --data-root"),
        (["train", "--dataset", "mnist", "--model", "vit_small", "--epochs", "0"], "hmtconv: error: epochs must be"),
        (["train", "--epochs", "x"], "hmtconv train: error: argument --epochs: invalid int value: 'x'"),
        (["train", "--model", "nope"], "hmtconv train: error: argument --model: invalid choice: 'nope'"),
        (["train", "--model", "vit_small", "--model-arg", "patch=7"],
         "hmtconv: error: vit_small has no argument 'patch'; its own are patch_size, hidden_dim, num_layers, num_heads"),
        (["train", "--model-arg", "num_classes=3"],
         "hmtconv: error: model argument 'num_classes' of vgg_small comes from the dataset"),
        (["train", "--model-arg", "7"], "hmtconv train: error: argument --model-arg: expected KEY=VALUE, got '7'"),
        ([], "hmtconv: error: the following arguments are required: COMMAND"),
        (["train", "--lr", "-1"], "hmtconv: error: learning rate must be a positive number within float32's range (at most 3.4e+38), got -1.0"),
        (["train", "--lr", "nan"], "hmtconv: error: learning rate must be a positive number within float32's range (at most 3.4e+38), got nan"),
        (["train", "--lr", "1e308"], "hmtconv: error: learning rate must be a positive number within float32's range (at most 3.4e+38), got 1e+308"),
        (["train", "--weight-decay", "-1"], "hmtconv: error: weight decay must be a number >= 0 within float32's range (at most 3.4e+38), got -1.0"),
        (["train", "--model", "vit_small", "--model-arg", "patch_size=0", "--limit", "1"],
         "hmtconv: error: vit_small rejects --model-arg patch_size=0: "),
        (["train", "--model", "vit_small", "--model-arg", "num_heads=5", "--limit", "1"],  # (an assert in torch)
         "hmtconv: error: vit_small rejects --model-arg num_heads=5: embed_dim must be divisible by num_heads"),
        (["train", "--out", "/tmp"], "hmtconv: error: cannot write /tmp: it is a directory; give a file name"),
        (["train", "--seed", str(2**64)], f"hmtconv train: error: argument --seed: --seed must be in 0..{2**63 - 1}, got"),
        (["train", "--lr", "1e30", "--limit", "2", "--no-progress"],  # (was a NaN checkpoint, exit 0)
         "hmtconv: error: training diverged: the loss is nan at step 2 of epoch 1; lower the learning rate (it is 1e+30)"),
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
