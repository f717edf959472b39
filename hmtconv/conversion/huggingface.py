"""Hugging Face ``transformers`` image classifiers (ViT, DeiT, ConvNeXt, ResNet...) as they are.

Their forward returns a ``ModelOutput`` (``.logits`` beside other fields) where the SNN needs the
logits alone, and checks ``pixel_values.dtype`` in Python, which tracing answers from the example
(tracing.py). ``prepare`` gives its copy of such a model a forward that returns the logits, by a
subclass of the model's class under the same name, so the site names stay the model's own.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def is_hugging_face(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (told without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__)


def return_logits(model: nn.Module) -> None:
    """Make ``model``'s forward (in place) take the images alone and return the logits tensor."""
    cls = type(model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = cls.forward(self, pixel_values)
        return output[0] if isinstance(output, tuple) else logits(output)  # (a tuple: config.return_dict False)

    model.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})


def logits(output):
    """The logits in a model's output: a ``ModelOutput``'s (or a dict's) ``logits``; the first field
    of a ``ModelOutput`` without them (PP-LCNet's classifier returns its head's output as
    ``last_hidden_state``, as a tuple output would hold it first); else the output itself."""
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, Mapping) and hasattr(output, "to_tuple"):
        return output.to_tuple()[0]
    return output
