"""``--device`` names to torch devices, with one clear error for names that cannot work here; where a
model lives."""
from __future__ import annotations

import torch

from torch import nn

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, auto)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's parameters (inputs are moved to them); without
    parameters, its buffers' device and float32."""
    tensor = next(iter(model.parameters()), None)
    if tensor is not None:
        return tensor.device, tensor.dtype
    buffer = next(iter(model.buffers()), None)
    return buffer.device if buffer is not None else torch.device("cpu"), torch.float32
