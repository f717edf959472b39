"""``--device`` names to torch devices, with one clear error for names that cannot work here; where a
model lives; buffers that keep their dtype when a model is cast."""
from __future__ import annotations

import torch

from torch import nn

from .errors import UserError


def resolve_device(name: str, what: str = "--device") -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; errors call it
    ``what`` (the CLI's option, or an argument's name)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"{what} {name!r} is not a device name (cpu, cuda, cuda:1, auto)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{what} {name}: CUDA is not available on this machine")
    if device.type == "meta":
        raise UserError(f"{what} {name}: meta tensors hold shapes, no data, so nothing runs there (cpu, cuda, auto)")
    try:  # another accelerator (mps, xpu...) this machine or this torch build lacks
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"{what} {name} is not available here: {' '.join(str(error).split())}") from error
    return device


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's parameters (inputs are moved to them); without
    parameters, its buffers' device and float32."""
    tensor = next(iter(model.parameters()), None)
    if tensor is not None:
        return tensor.device, tensor.dtype
    buffer = next(iter(model.buffers()), None)
    return buffer.device if buffer is not None else torch.device("cpu"), torch.float32


class KeepsDtype(nn.Module):
    """The buffers named in ``KEEP_DTYPE`` (counts and statistics: a float16 cast would round them or
    overflow to inf) keep their dtype through ``.half()``, ``.to(dtype)`` and the like; they still
    follow the device."""

    KEEP_DTYPE: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in self.KEEP_DTYPE}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if old is not None and new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self
