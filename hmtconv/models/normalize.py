"""Per-channel input normalization as the model's first layer (models own their normalization)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UserError


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers so they travel in the state_dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise UserError(f"Normalize: mean has {len(mean)} channels but std has {len(std)}")
        if min(std) <= 0:
            raise UserError(f"Normalize: std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def make_normalize(in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> Normalize:
    """Normalize for ``in_channels``; a missing mean/std means the identity (0 and 1)."""
    mean = [0.0] * in_channels if mean is None else list(mean)
    std = [1.0] * in_channels if std is None else list(std)
    if len(mean) != in_channels:
        raise UserError(f"mean/std have {len(mean)} channels but the model has in_channels={in_channels}")
    return Normalize(mean, std)
