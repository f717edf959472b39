"""Module swapping for models torch.fx cannot trace (data-dependent control flow, ...).

Only modules can be swapped: ``nn.ReLU`` (and clipped ReLU) modules become sites (a ReLU module
the example batch calls several times gets a site per call, :class:`CallSites`, as a traced graph
gives each call site a module; 3-d activations at them are taken as tokens ``[B, N, C]``), max
pooling stays after its neuron (compensated), and
functional activations stay float. :func:`unconverted.find_unconverted` reports those (every op on
spikes that is not linear), products of two spike trains and reductions over the batch dim by
running a calibration batch.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn

from .. import distributed
from .compensated import COMPENSATED
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


class CallSites(nn.ModuleList):
    """The sites of a ReLU module that the forward calls several times, one per call the example
    batch made, as a traced graph gives each call site a module (torchvision's BasicBlock applies
    ``self.relu`` before and after its residual add, to inputs of other scales: one threshold for
    both cost a module-swapped ResNet18 on MNIST 7 points at T = 1; its Bottleneck calls it at 4
    and 16 channels). Call i of a forward goes to site i (the model's pre-hook
    :func:`restart_calls` counts from 0 at each forward); calls beyond the example's (a number that
    depends on the data) go to the last site of their per-sample size, so any data runs."""

    sizes: tuple = ()  # (pickled before they were kept: calls beyond the sites are an error)

    def __init__(self, sites: list[nn.Module], name: str, sizes: list[tuple[int, ...]]):
        super().__init__(sites)
        self.name, self.sizes, self.calls = name, tuple(sizes), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call, self.calls = self.calls, self.calls + 1
        if call >= len(self):
            same = [i for i, size in enumerate(self.sizes) if size == tuple(x.shape[1:])]
            if not same:
                raise RuntimeError(f"{self.name} is called {call + 1} times in this forward, on per-sample shape "
                                   f"{tuple(x.shape[1:])} the last time, which none of the {len(self)} calls of the "
                                   f"example batch it was prepared with had (a model fx cannot trace: a site per "
                                   f"call); prepare with example_inputs that take every branch, or make the model "
                                   f"traceable")
            call = same[-1]
        return self[call](x)


def restart_calls(model: nn.Module, args) -> None:
    for module in model.modules():
        if isinstance(module, CallSites):
            module.calls = 0


def call_sizes(model: nn.Module, example: torch.Tensor | None) -> dict[str, list[tuple[int, ...]]]:
    """The per-sample input shape of each call the forward makes of each ReLU module on
    ``example`` (none without one, or where the model fails on it: calibration will say why)."""
    sizes: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    if example is None:
        return sizes
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: sizes[name].append(tuple(args[0].shape[1:])))
             for name, module in model.named_modules() if is_relu(module)]
    if not hooks:  # (no ReLU module: nothing to count, no forward to run)
        return sizes
    try:
        with torch.no_grad():
            model(example.clone())  # (a clone: an in-place op on the input would write the caller's batch)
    except Exception:
        sizes.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def unshare_stateless(model: nn.Module) -> None:
    """A ReLU or another stateless module convert handles (GELU, max pooling...) held by several
    parents (``act = nn.ReLU(); self.a = Block(act); self.b = Block(act)``) gets a copy in each:
    module swapping replaces a module at one name, which left the others a float op on spikes. (A
    module reached through one shared parent keeps being shared: it is the same call site.)"""
    first: dict[int, tuple[int, str]] = {}  # module -> the (parent, attribute) slot it was seen in
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not (is_relu(module) or type(module) in COMPENSATED):
            continue
        parent, _, leaf = name.rpartition(".")
        slot = (id(model.get_submodule(parent)), leaf)
        if first.setdefault(id(module), slot) != slot and model.get_submodule(name) is module:
            model.set_submodule(name, copy.deepcopy(module))


def agreed_sizes(sizes: dict[str, list[tuple[int, ...]]]) -> dict[str, list[tuple[int, ...]]]:
    """Under torchrun, the call sizes of the lowest rank that has them, on every rank: the sites
    must be the same for the statistics to merge, and rank 0's example is the first calibration
    batch, the one a single process prepares with (where the number of calls depends on the data)."""
    return next((ranked for ranked in distributed.all_gather_objects(dict(sizes)) if ranked), {})


def prepare_modules(model: nn.Module, identity: str, hist: HistogramConfig | None,
                    example: torch.Tensor | None = None) -> nn.Module:
    unshare_stateless(model)
    sizes = agreed_sizes(call_sizes(model, example))
    for name, module in list(model.named_modules()):
        if is_relu(module):
            calls = sizes.get(name) or [None]  # (not called by the example, or none: one site)
            sites = [ObservedActivation(False, hist, ceiling=ceiling_of(module), in_place=module.inplace)
                     for _ in calls]
            model.set_submodule(name, sites[0] if len(sites) == 1 else CallSites(sites, name, calls))
        elif identity in ("all", "linear") and isinstance(module, SYNAPTIC):
            model.set_submodule(name, InputSite(ObservedActivation(True, hist, read_channels_first(module)), module))
    if any(isinstance(module, CallSites) for module in model.modules()):
        model.register_forward_pre_hook(restart_calls)
    return model


def share_calls_as_saved(prepared: nn.Module, saved_sites: set[str]) -> None:
    """An SNN file written when a module's calls at one size shared a site (hmtconv before sites
    per call) holds that site under the module's name: rebuilt, it gets one site again."""
    for name, module in list(prepared.named_modules()):
        if isinstance(module, CallSites) and name in saved_sites and len(set(module.sizes)) == 1:
            prepared.set_submodule(name, module[0])


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
