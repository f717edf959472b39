"""Seeded DataLoaders and the calibration subset."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import UserError

CALIB_SPLITS = ("train", "val")


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, num_workers: int = 0
) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` (its own generator, not the global RNG)."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers)


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
