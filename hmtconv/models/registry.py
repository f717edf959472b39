"""Registry of the built-in architectures (timm-style: a plain dict filled by a decorator)."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import UserError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name. Builders take ``in_channels``, ``num_classes``,
    ``image_size``, ``mean``, ``std`` plus their own keyword arguments, all JSON-able."""
    MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered architecture ``name`` with freshly initialized weights."""
    if name not in MODELS:
        raise UserError(f"unknown built-in model {name!r}; choose one of {', '.join(list_models())}")
    return MODELS[name](**kwargs)
