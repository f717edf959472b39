"""Module swapping for models torch.fx cannot trace (data-dependent control flow, ...).

Only modules can be swapped: ``nn.ReLU`` (and clipped ReLU) modules become sites (a ReLU module
called twice shares one neuron and one set of statistics; 3-d activations at them are taken as
tokens ``[B, N, C]``), max pooling stays after its neuron (compensated), and
functional activations stay float. :func:`find_unconverted` reports those by running one batch
and recording nonlinear torch functions called outside the sites and compensable modules.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .compensated import COMPENSATED
from .energy import SYNAPTIC
from .functional import FUNCTIONAL, IN_PLACE_FUNCTIONS
from .layout import read_channels_first
from .observers import HistogramConfig
from .sites import ObservedActivation, ceiling_of, is_relu

LINEAR_CALLS = (F.linear, F.conv1d, F.conv2d, F.conv3d)


def _watched() -> dict:
    """The nonlinear calls to report (as a TorchFunctionMode sees them) and their names: ReLUs,
    matmuls, attention, and every other call graph.normalize makes a neuron or a compensated
    module of (max pooling, clamps, F.hardtanh...), methods by name, in place too."""
    watched = {torch.relu_: "relu_", torch.Tensor.relu_: "relu_", torch.Tensor.__matmul__: "matmul",
               torch.bmm: "bmm", F.scaled_dot_product_attention: "scaled_dot_product_attention"}
    for call in (*FUNCTIONAL, *IN_PLACE_FUNCTIONS, F.relu, torch.relu, "relu"):
        if isinstance(call, str):  # a method, and its in-place form
            funcs = [getattr(torch.Tensor, name) for name in (call, call + "_") if hasattr(torch.Tensor, name)]
        else:
            funcs = [] if call in LINEAR_CALLS else [call]
        for func in funcs:
            watched.setdefault(func, func.__name__)
    return watched


_WATCHED = _watched()


class InputSite(nn.Sequential):
    """``(site, layer)``: the layer's input spikes first. Attributes it does not have come from the
    layer, so a model that reads ``self.fc.weight`` keeps working (its functional calls bypass
    the site, which then never sees data: convert drops it and reports it)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            layers = list(self.__dict__.get("_modules", {}).values())  # (none yet while copying or loading)
            if len(layers) != 2:
                raise
            return getattr(layers[1], name)


def prepare_modules(model: nn.Module, identity: str, hist: HistogramConfig) -> nn.Module:
    for name, module in list(model.named_modules()):
        if is_relu(module):
            model.set_submodule(name, ObservedActivation(False, hist, ceiling=ceiling_of(module)))
        elif identity in ("all", "linear") and isinstance(module, SYNAPTIC):
            model.set_submodule(name, InputSite(ObservedActivation(True, hist, read_channels_first(module)), module))
    return model


def drop_unreached_sites(model: nn.Module, sites: dict[str, ObservedActivation]) -> list[tuple[str, str]]:
    """Sites calibration never reached (a layer called through its weights, a module the forward
    does not use) become identities; returns them as (name, why) for the report."""
    dropped = []
    for name, site in sites.items():
        if site.observer.count == 0:
            model.set_submodule(name, nn.Identity())
            dropped.append((name, "site never reached in calibration (a layer used through its weights?)"))
    return dropped


class _Recorder(TorchFunctionMode):
    def __init__(self, stack: list[str], found: set[tuple[str, str]]):
        super().__init__()
        self.stack, self.found = stack, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # (a 0-d result is a number for Python, ``if h.max() > 0``: no activation)
        scalar = isinstance(out, torch.Tensor) and out.dim() == 0
        if func in _WATCHED and self.stack and self.stack[-1] is not None and not scalar:
            self.found.add((self.stack[-1], _WATCHED[func]))
        return out


@torch.no_grad()
def find_unconverted(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, str]], object]:
    """(qualified module name, op) of nonlinear functions that will run in float on spikes, and
    the model's output on ``x``."""
    stack: list[str | None] = []
    found: set[tuple[str, str]] = set()
    hooks = []

    def enter(owner):
        return lambda module, args: stack.append(owner)  # list.append returns None: args unchanged

    def leave(module, args, output):
        stack.pop()  # returns None, so the output is kept

    handled: list[str] = []  # the types convert wraps (exact: a subclass may compute otherwise), and the sites
    for name, module in model.named_modules():
        if any(name.startswith(f"{h}.") for h in handled):
            continue  # inside one: a site's observer's amax and clamps (its tensor path) are the site's own work
        is_handled = type(module) in COMPENSATED or isinstance(module, ObservedActivation)
        if is_handled:
            handled.append(name)
        owner = None if is_handled else (name or "<root>")
        hooks.append(module.register_forward_pre_hook(enter(owner)))
        hooks.append(module.register_forward_hook(leave))
    try:
        with _Recorder(stack, found):
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return sorted(found), out
