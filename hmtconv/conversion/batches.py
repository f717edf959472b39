"""What a loader yields: ``(images, labels, ...)`` batches (or images alone where no accuracy is
taken), checked with errors that say which batch is at fault and how to fix it."""
from __future__ import annotations

import itertools
import numbers
from typing import Iterable

import torch


def model_input(batch, device: torch.device, dtype: torch.dtype, where: str) -> torch.Tensor:
    """The images of ``batch`` (a tensor or ``(inputs, labels, ...)``) on the model's device and in
    its dtype; non-float or non-finite images are errors that say which batch."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a tensor of images (or (images, labels)), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where} has {x.dtype} images; convert them to float first (e.g. transforms.ToTensor())")
    x = x.to(device=device, dtype=dtype)
    if not torch.isfinite(x).all():
        raise ValueError(f"{where} has NaN or inf in its input images (shape {list(x.shape)}); "
                         f"clean the data or its transform")
    return x


def check_loader(loader, what: str) -> None:
    """A TypeError unless ``loader`` can be iterated for batches (a tensor iterates its rows)."""
    iterable = hasattr(type(loader), "__iter__") or hasattr(type(loader), "__getitem__")  # (a Dataset: its hint later)
    if isinstance(loader, (torch.Tensor, str, bytes)) or not iterable:
        hint = ": wrap a tensor of images as [(images, labels)]" if isinstance(loader, torch.Tensor) else ""
        raise TypeError(f"{what}: the loader must yield (images, labels) batches (a DataLoader, a list of pairs), "
                        f"got a {type(loader).__name__}{hint}")


def first_batches(loader: Iterable, max_batches: int | None, what: str) -> Iterable:
    """``loader`` stopped after ``max_batches`` batches, without pulling one more (a generator
    keeps it)."""
    check_loader(loader, what)
    if max_batches is None:
        return loader
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"{what}: max_batches must be a positive integer or None, got {max_batches!r}")
    return itertools.islice(loader, max_batches)


def one_sample_hint(batch) -> str:
    """A hint where ``batch`` has a single label (a number or a 0-d tensor): one sample of a
    dataset, its image without the batch dim, as iterating the Dataset itself yields."""
    label = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if not (isinstance(label, numbers.Number) or getattr(label, "ndim", None) == 0):
        return ""
    return ("; it has a single label: is it one sample of a dataset? iterate a torch.utils.data.DataLoader(dataset, "
            "batch_size=...), not the dataset itself")


def batch_labels(batch, images: torch.Tensor, where: str) -> torch.Tensor:
    """The class labels of an ``(inputs, labels, ...)`` batch: a 1-D integer tensor (a list of
    ints is taken), one per image."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"{where}: accuracy needs (images, labels) batches, got "
                        f"{'images only' if isinstance(batch, torch.Tensor) else type(batch).__name__}")
    y = batch[1]
    if not isinstance(y, torch.Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{where}: labels must be a tensor of class indices, got {type(batch[1]).__name__}") \
                from error
    if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        if y.dim() == 2:
            hint = "; pass labels.view(-1)" if y.shape[1] == 1 else "; one-hot labels? pass labels.argmax(1)"
        else:
            hint = one_sample_hint(batch) if y.dim() == 0 else ""
        raise ValueError(f"{where}: labels must be a 1-D integer tensor of class indices, got {y.dtype} of shape "
                         f"{list(y.shape)}{hint}")
    if len(y) != len(images):
        raise ValueError(f"{where} has {len(images)} images but {len(y)} labels")
    return y
