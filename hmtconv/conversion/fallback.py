"""Module swapping for models torch.fx cannot trace (data-dependent control flow, ...).

Only modules can be swapped: ``nn.ReLU`` (and clipped ReLU) modules become sites (a ReLU module
called twice shares one neuron and one set of statistics; 3-d activations at them are taken as
tokens ``[B, N, C]``), max pooling stays after its neuron (compensated), and
functional activations stay float. :func:`unconverted.find_unconverted` reports those, products
of two spike trains and reductions over the batch dim by running a calibration batch.
"""
from __future__ import annotations

from torch import nn

from .energy import SYNAPTIC
from .layout import read_channels_first
from .observers import HistogramConfig
from .sites import ObservedActivation, ceiling_of, float_op, is_relu


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


def prepare_modules(model: nn.Module, identity: str, hist: HistogramConfig | None) -> nn.Module:
    for name, module in list(model.named_modules()):
        if is_relu(module):
            model.set_submodule(name, ObservedActivation(False, hist, ceiling=ceiling_of(module),
                                                         in_place=module.inplace))
        elif identity in ("all", "linear") and isinstance(module, SYNAPTIC):
            model.set_submodule(name, InputSite(ObservedActivation(True, hist, read_channels_first(module)), module))
    return model


def drop_unreached_sites(model: nn.Module, sites: dict[str, ObservedActivation]) -> list[tuple[str, str]]:
    """Sites calibration never reached (a layer called through its weights, a module the forward
    does not use, a branch the data did not take) become the float ops they stand for (identity,
    ReLU); returns them as (name, why) for the report."""
    dropped = []
    for name, site in sites.items():
        if site.observer.count == 0:
            model.set_submodule(name, float_op(site))
            dropped.append((name, "site never reached in calibration (a branch the data did not take, or a "
                                  "layer used through its weights?): left a float op"))
    return dropped
