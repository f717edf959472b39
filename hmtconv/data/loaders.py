"""Seeded DataLoaders and the calibration subset."""
from __future__ import annotations

import os
import signal

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import DatasetFolder

from ..errors import UserError

CALIB_SPLITS = ("train", "val")
MAX_WORKERS = 8


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` (its own generator, not the global RNG);
    ``num_workers`` loader processes (:func:`default_workers` suggests how many), ``pin_memory`` for
    batches bound for a GPU."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"workers (loader processes) must be an integer >= 0, got {num_workers!r}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
                      pin_memory=pin_memory, worker_init_fn=_leave_termination_to_the_main_process)


def _leave_termination_to_the_main_process(worker: int) -> None:
    """SIGTERM sent to the whole process group (a scheduler, ``timeout``) ends the main process
    cleanly (cli/main.py), which then stops its workers; a worker ended by it first made the main
    one print a DataLoader traceback on its way out."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def default_workers(dataset: Dataset) -> int:
    """Loader processes the CLI uses unless told (``--workers``). Images decoded from files (an
    ImageFolder's JPEGs, decoded and resized one by one in Python) load in up to ``MAX_WORKERS``
    processes, leaving a CPU to the main one and sharing the rest with torchrun's other processes on
    this machine; images held in memory (MNIST, CIFAR) load faster in the main process than workers
    could hand them over. (The built-in datasets' transforms are deterministic: the batches are the
    same with any number of workers.)"""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not isinstance(dataset, DatasetFolder):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # (set by torchrun)
    except ValueError:
        processes = 1
    return max(0, min(MAX_WORKERS, cpus // processes - 1))


def evaluation_subset(dataset: Dataset, limit: int) -> Subset:
    """The first ``limit`` images, or, where the split is sorted by class (ImageFolder's
    ``targets``), ``limit`` images evenly spaced over it, so that every class is in."""
    n, targets = len(dataset), getattr(dataset, "targets", None)
    if limit < n and targets is not None and len(targets) == n and bool((torch.as_tensor(targets).diff() >= 0).all()):
        return Subset(dataset, [i * n // limit for i in range(limit)])
    return Subset(dataset, range(min(limit, n)))


def calibration_subset(
    train_set: Dataset, eval_set: Dataset, *, split: str = "train", size: int = 1024, seed: int | None = None
) -> Subset:
    """``size`` images of the calibration split: the first ones, or a random choice when ``seed`` is
    given. ``split="train"`` by default so calibration never sees the evaluation images unless
    asked for with ``split="val"``."""
    if split not in CALIB_SPLITS:
        raise UserError(f"calibration split {split!r} is not one of {', '.join(CALIB_SPLITS)}")
    dataset = train_set if split == "train" else eval_set
    if not 1 <= size <= len(dataset):
        raise UserError(f"calibration size {size} is outside 1..{len(dataset)} (the {split} split's size)")
    if seed is None:
        indices = torch.arange(size)
    else:
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return Subset(dataset, indices.tolist())
