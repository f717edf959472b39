"""Train the built-in models (``hmtconv train``): seeded, deterministic on CPU, checkpointed atomically."""
from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import default_workers, get_datasets, make_loader
from .cache import cache_dir as default_cache_dir
from .device import resolve_device
from .errors import UserError
from .models import check_model_args, check_model_fits, create_model, save_checkpoint
from .report.provenance import library_versions


@dataclass(frozen=True)
class OptimizerRecipe:
    build: Callable[..., torch.optim.Optimizer]  # (params, lr, weight_decay) -> optimizer
    lr: float  # default peak learning rate
    weight_decay: float


OPTIMIZERS = {
    "sgd": OptimizerRecipe(
        lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd), 0.1, 5e-4
    ),
    "adamw": OptimizerRecipe(lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd), 2e-3, 0.05),
}

EVAL_BATCH_SIZE = 500  # no gradients: larger batches are cheaper per image

# Both are stepped once per batch; (optimizer, peak lr, total steps) -> scheduler.
SCHEDULES = {
    "onecycle": lambda opt, lr, steps: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps),
    "cosine": lambda opt, lr, steps: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps),
}


@dataclass
class TrainConfig:
    model: str = "vgg_small"  # a built-in architecture
    model_args: dict = field(default_factory=dict)  # its own keyword arguments, e.g. {"patch_size": 7}
    dataset: str = "mnist"
    data_root: str | None = None
    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum 0.9) or "adamw"
    lr: float | None = None  # peak learning rate; None: the optimizer's default (0.1 sgd, 2e-3 adamw)
    weight_decay: float | None = None  # None: the optimizer's default (5e-4 sgd, 0.05 adamw)
    schedule: str = "onecycle"  # or "cosine"
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    limit: int | None = None  # at most this many batches per epoch and for the test evaluation
    workers: int | None = None  # data loader processes; None: data.loaders.default_workers
    progress: bool = True


@dataclass
class TrainResult:
    model: nn.Module  # in eval mode
    test_accuracy: float
    seconds: float  # training and evaluation, without data loading
    meta: dict  # what the checkpoint stores as metadata
    path: Path | None  # the checkpoint, if one was written


@contextmanager
def deterministic():
    """Deterministic kernels inside; ops that have none warn instead of failing (warn_only)."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def check_config(config: TrainConfig) -> None:
    check_model_args(config.model, config.model_args)
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer {config.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if config.schedule not in SCHEDULES:
        raise UserError(f"schedule {config.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if config.epochs < 1:
        raise UserError(f"epochs must be at least 1, got {config.epochs}")
    if config.limit is not None and config.limit < 1:
        raise UserError(f"limit must be at least 1 batch, got {config.limit}")
    # The optimizers scale float32 gradients by these: a larger number overflows inside torch.
    largest = torch.finfo(torch.float32).max
    if config.lr is not None and not 0 < config.lr <= largest:
        raise UserError(f"learning rate must be a positive number within float32's range (at most {largest:.3g}), got {config.lr}")
    if config.weight_decay is not None and not 0 <= config.weight_decay <= largest:
        raise UserError(f"weight decay must be a number >= 0 within float32's range (at most {largest:.3g}), got {config.weight_decay}")
    if not 0 <= config.label_smoothing < 1:
        raise UserError(f"label smoothing must be in [0, 1), got {config.label_smoothing}")


def build_model(name: str, kwargs: dict, model_args: dict) -> nn.Module:
    """``create_model(name, **kwargs)``; an error the constructor raises on the user's ``model_args``
    is a UserError naming them."""
    try:
        return create_model(name, **kwargs)
    except UserError:
        raise
    # (AssertionError: torch checks some arguments with assert, e.g. MultiheadAttention's embed_dim % num_heads)
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError, AssertionError) as error:
        if not model_args:
            raise
        values = " ".join(f"{key}={value!r}" for key, value in model_args.items())
        raise UserError(f"{name} rejects --model-arg {values}: {error}") from error


def evaluate_accuracy(
    model: nn.Module, loader: DataLoader, device: torch.device, limit: int | None = None, progress: bool = False
) -> float:
    """Top-1 accuracy over the first ``limit`` batches of ``loader`` (all when None)."""
    model.eval()
    correct = total = 0
    total_batches = min(limit or len(loader), len(loader))
    batches = tqdm(islice(loader, limit), total=total_batches, desc="test", disable=None if progress else True,
                   leave=False)
    with torch.no_grad():
        for images, labels in batches:
            predictions = model(images.to(device)).argmax(1).cpu()
            correct += (predictions == labels).sum().item()
            total += len(labels)
    return correct / total


def train(config: TrainConfig, out: str | Path | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.dataset``, evaluate on its test split, and write a
    checkpoint to ``out`` (loadable by ``load_model(out)`` and ``load_checkpoint``)."""
    check_config(config)
    recipe = OPTIMIZERS[config.optimizer]
    lr = recipe.lr if config.lr is None else config.lr
    weight_decay = recipe.weight_decay if config.weight_decay is None else config.weight_decay
    device = resolve_device(config.device)
    train_set, eval_set, info = get_datasets(config.dataset, config.data_root)
    kwargs = dict(
        in_channels=info.channels, num_classes=info.num_classes, image_size=info.image_size,
        mean=list(info.mean), std=list(info.std), **config.model_args,
    )
    with deterministic():
        torch.manual_seed(config.seed)  # the model's initialization; the loader has its own generator
        model = build_model(config.model, kwargs, config.model_args)
        check_model_fits(model, info, f"built-in {config.model}")
        model.to(device)
        pinned = device.type == "cuda"
        workers = default_workers(train_set) if config.workers is None else config.workers
        loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed, num_workers=workers,
                             pin_memory=pinned)
        steps = min(len(loader), config.limit or len(loader))
        optimizer = recipe.build(model.parameters(), lr, weight_decay)
        scheduler = SCHEDULES[config.schedule](optimizer, lr, config.epochs * steps)
        start = time.perf_counter()
        for epoch in range(config.epochs):
            model.train()
            desc = f"epoch {epoch + 1}/{config.epochs}"
            # a bar on terminals; in a log (stderr not a terminal), a line per epoch
            bar = tqdm(islice(loader, steps), total=steps, desc=desc, disable=None if config.progress else True)
            losses = 0.0
            for step, (images, labels) in enumerate(bar, 1):
                logits = model(images.to(device))
                loss = F.cross_entropy(logits, labels.to(device), label_smoothing=config.label_smoothing)
                value = loss.item()
                if not math.isfinite(value):  # (no checkpoint of a diverged model is written)
                    raise UserError(f"training diverged: the loss is {value} at step {step} of epoch {epoch + 1}; "
                                    f"lower the learning rate (it is {lr:g})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.set_postfix(loss=f"{value:.3f}")
                losses += value
            if config.progress and bar.disable:
                print(f"{desc}: mean loss {losses / steps:.4f}", file=sys.stderr, flush=True)
        eval_loader = make_loader(eval_set, EVAL_BATCH_SIZE, num_workers=workers, pin_memory=pinned)
        accuracy = evaluate_accuracy(model, eval_loader, device, config.limit, config.progress)
        seconds = time.perf_counter() - start
    config_record = asdict(config) | {"lr": lr, "weight_decay": weight_decay, "device": str(device)}
    del config_record["progress"], config_record["workers"]  # (neither changes the model)
    meta = {
        "config": config_record,
        "data_source": info.source,
        "test_accuracy": accuracy,
        "test_images": min(len(eval_set), (config.limit or len(eval_set)) * EVAL_BATCH_SIZE),
        "seconds": seconds,
        "versions": library_versions(),
    }
    model.cpu().eval()
    path = save_checkpoint(out, model, config.model, kwargs, meta) if out is not None else None
    return TrainResult(model, accuracy, seconds, meta, path)


def trained_model(
    arch: str = "vgg_small",
    dataset: str = "mnist",
    epochs: int = 3,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    *,
    data_root: str | None = None,
    progress: bool = True,
) -> Path:
    """The checkpoint for this recipe: cached under ``cache_dir`` (default ``$HMTCONV_CACHE`` or
    ``~/.cache/hmtconv``) if present, else trained now (default hyperparameters) and cached."""
    name = re.sub(r"[^\w.-]", "_", f"{arch}-{dataset}-e{epochs}-s{seed}") + ".pt"
    path = Path(cache_dir or default_cache_dir()) / name
    if not path.is_file():
        config = TrainConfig(
            model=arch, dataset=dataset, data_root=data_root, epochs=epochs, seed=seed, progress=progress
        )
        train(config, out=path)
    return path
