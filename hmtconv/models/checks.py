"""Check that a model fits the data (channels, image size, classes) before any calibration."""
from __future__ import annotations

import torch
from torch import nn

from ..conversion.huggingface import logits
from ..data.registry import DataInfo
from ..device import placement
from ..errors import UserError


def first_conv(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)


def check_model_fits(model: nn.Module, info: DataInfo, label: str = "the model") -> None:
    """Run one zero batch of the data's shape through ``model`` (no_grad, eval mode) and raise a
    UserError naming the mismatch: channels, image size, or number of classes."""
    channels, height, width = info.shape
    conv = first_conv(model)
    # Checked before running: a per-channel Normalize would broadcast 1 channel to 3 and hide it.
    if conv is not None and conv.in_channels != channels:
        raise UserError(
            f"{label} expects {conv.in_channels}-channel images but dataset {info.name!r} has {channels} channel(s)"
        )
    device, dtype = placement(model)  # (a float64 model takes float64 images, as convert gives it)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, channels, height, width, device=device, dtype=dtype))
    except (RuntimeError, AssertionError, ValueError) as error:
        reason = " ".join(str(error).split())  # one line
        raise UserError(
            f"{label} does not accept {height}x{width} images with {channels} channel(s) "
            f"from dataset {info.name!r}: {reason}"
        ) from error
    finally:
        model.train(was_training)
    out = logits(out)  # (a Hugging Face model's ModelOutput)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{label} returns {shape}; expected class scores [batch, {info.num_classes}]")
    if out.shape[1] != info.num_classes:
        raise UserError(
            f"{label} outputs {out.shape[1]} classes but dataset {info.name!r} has {info.num_classes}"
        )
