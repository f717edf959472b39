"""The verbs, in the style of torch.ao.quantization: ``prepare`` -> ``calibrate`` -> ``convert``.

``prepare`` inserts observed sites, ``calibrate`` runs data through them (statistics only, in
buffers), ``convert`` turns statistics into thresholds and builds the SNN. Each works on a copy
unless ``inplace=True``; one calibration serves any n, T, policy, neuron and granularity.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import fx, nn

from .attention import decompose_attention
from .build import build_snn
from .fallback import find_unconverted, prepare_modules
from .graph import prepare_graph
from .observers import HistogramConfig
from .sites import ObservedActivation
from .snn import IDENTITIES, SNN, ConversionConfig, ConversionReport


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@dataclass
class PrepareInfo:
    """Plain data kept on a prepared model (in ``GraphModule.meta``, which copies keep)."""

    identity: str
    traced: bool
    trace_error: str | None = None
    input_shape: tuple[int, ...] | None = None
    unconverted: list[tuple[str, str]] = field(default_factory=list)


_KEY = "hmtconv_prepare"


def _info(model: nn.Module) -> PrepareInfo | None:
    return model.meta.get(_KEY) if isinstance(model, fx.GraphModule) else getattr(model, _KEY, None)


def is_prepared(model: nn.Module) -> bool:
    return _info(model) is not None


def prepare(model: nn.Module, *, identity: str = "none", inplace: bool = False,
            histogram: HistogramConfig = HistogramConfig()) -> nn.Module:
    """Insert observed sites (ReLUs, and the y = x sites that ``identity`` asks for)."""
    if identity not in IDENTITIES:
        raise ValueError(f"identity must be one of {IDENTITIES}, got {identity!r}")
    if isinstance(model, SNN) or is_prepared(model):
        raise TypeError(f"prepare expects the float model, got an already {'converted' if isinstance(model, SNN) else 'prepared'} {type(model).__name__}")
    model = (model if inplace else copy.deepcopy(model)).eval()
    decompose_attention(model)
    try:
        prepared, traced, trace_error = prepare_graph(model, identity, histogram), True, None
    except Exception as error:  # fx could not trace it: swap modules instead (fallback.py)
        prepared, traced = prepare_modules(model, identity, histogram), False
        trace_error = f"{type(error).__name__}: {error}"
    if not any(isinstance(m, ObservedActivation) for m in prepared.modules()):
        raise ValueError(f"{type(model).__name__} has no ReLU to convert (and identity={identity!r} adds "
                         f"no y = x site); use identity='all' for networks without ReLU such as ViT")
    info = PrepareInfo(identity, traced, trace_error)
    if traced:
        prepared.meta[_KEY] = info
    else:
        setattr(prepared, _KEY, info)
    return prepared


@torch.no_grad()
def calibrate(prepared: nn.Module, loader: Iterable, *, max_batches: int | None = None) -> nn.Module:
    """Run ``(inputs, labels)`` batches through the observers (in place; statistics accumulate)."""
    if not is_prepared(prepared):
        raise TypeError(f"calibrate expects the output of prepare(), got {type(prepared).__name__}")
    prepared.eval()
    device = _device(prepared)
    info = _info(prepared)
    seen = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
        if info.input_shape is None:
            info.input_shape = tuple(x.shape[1:])
            if not info.traced:  # this first run also feeds the observers
                info.unconverted = find_unconverted(prepared, x)
                seen += 1
                continue
        prepared(x)
        seen += 1
    if seen == 0:
        raise ValueError("calibration loader yielded no batches")
    return prepared


def convert(model: nn.Module, calib_loader: Iterable | None = None, *, n: int = 4, T: int = 4,
            policy: str | float = "opt", neuron: str = "hmt", identity: str = "none",
            communicate: bool = True, granularity: str = "layer", inplace: bool = False) -> SNN:
    """ANN (or a prepared model) -> SNN. A float model needs ``calib_loader``; a prepared one
    is calibrated further by it when given."""
    config = ConversionConfig(n, T, policy, neuron, identity, communicate, granularity)
    if is_prepared(model):
        if _info(model).identity != identity:
            raise ValueError(f"the model was prepared with identity={_info(model).identity!r} but convert got "
                             f"identity={identity!r}; prepare again or pass the same value")
        prepared = model if inplace else copy.deepcopy(model)
    elif calib_loader is None:
        raise ValueError("convert(model, calib_loader, ...) needs calibration data for a float model "
                         "(or pass the output of prepare() and calibrate())")
    else:
        prepared = prepare(model, identity=identity, inplace=inplace)
    if calib_loader is not None:
        calibrate(prepared, calib_loader)
    info = _info(prepared)
    if info.input_shape is None:
        raise ValueError("the prepared model has no calibration data: run calibrate(prepared, loader) first")
    report = ConversionReport(info.input_shape, info.traced, list(info.unconverted), info.trace_error)
    if info.traced:
        del prepared.meta[_KEY]
    else:
        delattr(prepared, _KEY)
    return build_snn(prepared, config, report)
