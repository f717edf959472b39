"""Registry of datasets (timm-style: a plain dict filled by a decorator) and ``get_datasets``."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import UserError

Transform = Callable | None


@dataclass(frozen=True)
class Splits:
    """What a dataset builder returns: the two splits plus what the images alone do not tell."""

    train: Dataset
    eval: Dataset
    num_classes: int
    mean: tuple[float, ...]  # per-channel statistics of the training images, for a model's Normalize
    std: tuple[float, ...]
    source: str  # where the images were read from, for logs and checkpoint metadata


@dataclass(frozen=True)
class DataInfo:
    """Shape of one image ``(C, H, W)`` as the model sees it, the number of classes, the statistics."""

    name: str
    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> int:
        """Height (all the datasets here yield square images)."""
        return self.shape[1]


DATASETS: dict[str, Callable[[str | None, Transform], Splits]] = {}


def register_dataset(name: str):
    """Register ``builder(root, transform) -> Splits`` under ``name``."""

    def decorator(builder):
        DATASETS[name] = builder
        return builder

    return decorator


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def get_datasets(spec: str, root: str | None = None, transform: Transform = None) -> tuple[Dataset, Dataset, DataInfo]:
    """``(train_set, eval_set, info)`` for ``spec``: a registered name, or ``name:PATH`` which uses
    PATH as the data root (``folder:PATH``). Items are ``(float image [C, H, W], int label)``;
    ``transform`` replaces the dataset's default one (e.g. a torchvision weights' preprocessing)."""
    name, _, path = spec.partition(":")
    if name not in DATASETS:
        raise UserError(f"unknown dataset {spec!r}; choose one of {', '.join(list_datasets())} or folder:PATH")
    folder = path or root
    if folder and not Path(folder).is_dir():  # (mnist would fall back to its package copy without a word)
        where = f"the path in --dataset {spec}" if path else "--data-root"
        raise UserError(f"{where}: {folder} is not a directory")
    splits = DATASETS[name](folder, transform)
    if len(splits.eval) == 0 or len(splits.train) == 0:
        raise UserError(f"dataset {spec!r} has an empty split (train {len(splits.train)}, eval {len(splits.eval)})")
    image = splits.eval[0][0]  # the shape after the transform is what the model will see
    if image.dim() != 3:
        raise UserError(f"dataset {spec!r} yields images of shape {list(image.shape)}; expected [C, H, W]")
    info = DataInfo(spec, tuple(image.shape), splits.num_classes, splits.mean, splits.std, splits.source)
    return splits.train, splits.eval, info
