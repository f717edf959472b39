"""CIFAR-10/100 and ImageNet-style folders through torchvision, and FakeData for smoke tests."""
from __future__ import annotations

from pathlib import Path

from torchvision import datasets
from torchvision import transforms as T

from ..errors import UserError
from .registry import Splits, Transform, register_dataset

CIFAR10_STATS = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_STATS = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_STATS = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def require_root(name: str, root: str | None) -> str:
    if root is None:
        raise UserError(f"dataset {name!r} needs --data-root (nothing is downloaded)")
    if not Path(root).is_dir():
        raise UserError(f"--data-root {root} is not a directory")
    return str(root)


def cifar(name: str, cls, folder: str, stats, root: str | None, transform: Transform) -> Splits:
    root = require_root(name, root)
    if not Path(root, folder).is_dir():
        raise UserError(
            f"{name}: {Path(root, folder)} not found; put torchvision's {cls.__name__} files there "
            f"(torchvision.datasets.{cls.__name__}({root!r}, download=True) on a machine with internet)"
        )
    try:
        train = cls(root, train=True, transform=transform or T.ToTensor())
        test = cls(root, train=False, transform=transform or T.ToTensor())
    except RuntimeError as error:  # torchvision's integrity check failed
        raise UserError(f"{name}: cannot read {Path(root, folder)}: {error}") from error
    return Splits(train, test, len(train.classes), *stats, f"torchvision {cls.__name__} under {root}")


@register_dataset("cifar10")
def cifar10(root: str | None, transform: Transform) -> Splits:
    return cifar("cifar10", datasets.CIFAR10, "cifar-10-batches-py", CIFAR10_STATS, root, transform)


@register_dataset("cifar100")
def cifar100(root: str | None, transform: Transform) -> Splits:
    return cifar("cifar100", datasets.CIFAR100, "cifar-100-python", CIFAR100_STATS, root, transform)


@register_dataset("folder")
def folder(root: str | None, transform: Transform) -> Splits:
    """ImageFolder at ``root/train`` and ``root/val`` (one subfolder per class), center-cropped to 224."""
    root = require_root("folder", root)
    transform = transform or T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    paths = {split: Path(root, split) for split in ("train", "val")}
    for path in paths.values():
        if not path.is_dir():
            raise UserError(
                f"image folder {path} not found; expected {root}/train and {root}/val with one subfolder per class"
            )
    try:
        splits = {split: datasets.ImageFolder(str(path), transform=transform) for split, path in paths.items()}
    except FileNotFoundError as error:  # a class folder without images
        raise UserError(f"image folders under {root}: {error}") from error
    if splits["train"].classes != splits["val"].classes:
        raise UserError(f"{root}/train and {root}/val have different class folders")
    num_classes = len(splits["train"].classes)
    return Splits(splits["train"], splits["val"], num_classes, *IMAGENET_STATS, f"image folders under {root}")


@register_dataset("imagenet")
def imagenet(root: str | None, transform: Transform) -> Splits:
    return folder(require_root("imagenet", root), transform)


@register_dataset("fake")
def fake(root: str | None, transform: Transform) -> Splits:
    """Random 3x32x32 images in 10 classes (torchvision FakeData), different for each split."""
    transform = transform or T.ToTensor()
    train = datasets.FakeData(512, (3, 32, 32), 10, transform=transform, random_offset=0)
    test = datasets.FakeData(256, (3, 32, 32), 10, transform=transform, random_offset=1_000_000)
    return Splits(train, test, 10, (0.5,) * 3, (0.25,) * 3, "torchvision FakeData (random images)")
