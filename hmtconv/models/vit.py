"""A small torchvision VisionTransformer for small images."""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn
from torchvision.models import VisionTransformer

from ..errors import UserError
from .normalize import make_normalize
from .registry import register_model


@register_model
def vit_small(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    patch_size: int = 4,
    hidden_dim: int = 96,
    num_layers: int = 4,
    num_heads: int = 4,
    mlp_dim: int | None = None,
) -> nn.Sequential:
    """ViT with ``(image_size / patch_size)**2`` patches; ``mlp_dim`` defaults to ``2 * hidden_dim``."""
    if image_size % patch_size:
        raise UserError(f"vit_small: image_size {image_size} is not a multiple of patch_size {patch_size}")
    vit = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim or 2 * hidden_dim,
        num_classes=num_classes,
    )
    # torchvision hard-codes 3 input channels in the patch embedding; rebuild it, initialized as there.
    vit.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
    fan_in = in_channels * patch_size * patch_size
    nn.init.trunc_normal_(vit.conv_proj.weight, std=math.sqrt(1 / fan_in))
    nn.init.zeros_(vit.conv_proj.bias)
    return nn.Sequential(OrderedDict(normalize=make_normalize(in_channels, mean, std), net=vit))
