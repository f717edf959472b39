"""Registry of the built-in architectures (timm-style: a plain dict filled by a decorator)."""
from __future__ import annotations

import inspect
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


DATA_ARGS = ("in_channels", "num_classes", "image_size", "mean", "std")  # set from the dataset


def builder(name: str) -> Callable[..., nn.Module]:
    if name not in MODELS:
        raise UserError(f"unknown built-in model {name!r}; choose one of {', '.join(list_models())}")
    return MODELS[name]


def check_model_args(name: str, model_args: dict) -> None:
    """``model_args`` are keyword arguments of builder ``name`` other than the dataset's own."""
    own = [p for p in inspect.signature(builder(name)).parameters if p not in DATA_ARGS]
    for key in model_args:
        if key in DATA_ARGS:
            raise UserError(f"model argument {key!r} of {name} comes from the dataset; do not set it")
        if key not in own:
            raise UserError(f"{name} has no argument {key!r}; its own are {', '.join(own) or 'none'}")


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered architecture ``name`` with freshly initialized weights."""
    return builder(name)(**kwargs)
