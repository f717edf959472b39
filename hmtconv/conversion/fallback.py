"""Module swapping for models torch.fx cannot trace (data-dependent control flow, ...).

Only modules can be swapped: ``nn.ReLU`` (and clipped ReLU) modules become sites, and with
``identity="all"`` the inputs of Conv and Linear modules not fed a neuron's spikes as they are
(:func:`fed_spikes`; a module that a zero image of the example's size calls several times gets a
site per call, :class:`CallSites`, as a traced graph gives each call site a module; 3-d
activations at them are taken as tokens ``[B, N, C]``); max
pooling moves before the neuron of a ReLU that feeds it alone (swapped_pools.py; elsewhere it
stays after its neuron, compensated); functional activations stay float.
:func:`unconverted.find_unconverted` reports those (every op on spikes that is not linear),
products of two spike trains and reductions over the batch dim by running a calibration batch.
"""
from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict

import torch
from torch import nn

from .compensated import COMPENSATED
from .energy import SYNAPTIC
from .layout import CHANNELS_FIRST, read_channels_first
from .observers import HistogramConfig
from .rebuild import saved_sites
from .sites import ObservedActivation, ceiling_of, float_op, is_relu
from .swapped_pools import MovedReLU, PooledSite, pool_moves, probe
from .unconverted import storage_id


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
    """The sites of a ReLU module (or of a layer's input) that the forward calls several times, one
    per call it makes on a zero image of the example's size, as a traced graph gives each call site
    a module (torchvision's BasicBlock applies ``self.relu`` before and after its residual add, to
    inputs of other scales: one threshold for both cost a module-swapped ResNet18 on MNIST 7
    points at T = 1; its Bottleneck calls it at 4 and 16 channels). Call i of a forward goes to
    site i (the model's hook :func:`restart_calls` counts from 0 at each forward) where its
    per-sample size is that site's, else (the data took another path) to the last site of its
    size; a size no site has is an error."""

    sizes: tuple = ()  # (pickled before they were kept: calls beyond the sites are an error)

    def __init__(self, sites: list[nn.Module], name: str, sizes: list[tuple[int, ...]]):
        super().__init__(sites)
        self.name, self.sizes, self.calls = name, tuple(sizes), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call, self.calls = self.calls, self.calls + 1
        size = tuple(x.shape[1:])
        if call >= len(self) or (self.sizes and self.sizes[call] != size):
            same = [i for i, known in enumerate(self.sizes) if known == size]
            if not same:
                raise RuntimeError(f"{self.name} is called on per-sample shape {size} (call {call + 1} of this "
                                   f"forward), which none of its {len(self)} sites was prepared for (a model fx "
                                   f"cannot trace: a site per call a zero image of the example's size makes); make "
                                   f"the model traceable, or give each call a module of its own")
            call = same[-1]
        return self[call](x)


def restart_calls(model: nn.Module, *hook_args) -> None:
    """Before and after each forward (hooks of the model): call counts from 0, and no moved ReLU
    holding a tensor its pool was never handed (stale, and copied with the model)."""
    for module in model.modules():
        if isinstance(module, CallSites):
            module.calls = 0
        elif isinstance(module, MovedReLU):
            module.input = module.output = None


def call_sizes(model: nn.Module, example: torch.Tensor | None, watched: set[str]) -> dict[str, list[tuple[int, ...]]]:
    """The per-sample input shape of each call the forward makes of each module named in
    ``watched`` on ``example`` (none without one, or where the model fails on it: calibration will
    say why)."""
    sizes: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    if example is None:
        return sizes
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: sizes[name].append(tuple(args[0].shape[1:])))
             for name, module in model.named_modules() if name in watched]
    if hooks and not probe(model, example, hooks)[0]:  # (no module to watch: no forward to run)
        sizes.clear()
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


def _version(t: torch.Tensor) -> int | None:
    """How many in-place writes ``t``'s storage has seen (None: an inference tensor keeps no count)."""
    try:
        return t._version
    except RuntimeError:
        return None


def fed_spikes(model: nn.Module, zeros: torch.Tensor | None, layers: set[str], producers: set[str]) -> set[str]:
    """The layers (named in ``layers``) that every call on ``zeros`` hands the output of one of
    ``producers`` (ReLU modules, and the max pools moved before their neurons) as it is, or a view
    of all of it (flattened, through eval-mode dropout), nothing written over since: spikes
    already, which a y = x site would only quantize again (the traced graph puts none there)."""
    if zeros is None or not layers or not producers:
        return set()
    made, fed = {}, defaultdict(list)  # the outputs by storage (held: no later tensor takes theirs)

    def unchanged(x, out, version) -> bool:
        """``x`` is all of ``out`` (a view from its first element) and nothing wrote over either."""
        return x.data_ptr() == out.data_ptr() and x.numel() == out.numel() and _version(x) == version

    def reads(name):
        def hook(module, args):
            x, key = args[0], storage_id(args[0])
            fed[name].append(key in made and unchanged(x, *made[key]))
        return hook

    def makes(module, args, out):
        if storage_id(out) is not None:
            made[storage_id(out)] = out, _version(out)
    hooks = [model.get_submodule(name).register_forward_hook(makes) for name in producers]
    hooks += [model.get_submodule(name).register_forward_pre_hook(reads(name)) for name in layers]
    if not probe(model, zeros, hooks)[0]:
        return set()
    return {name for name, calls in fed.items() if all(calls)}


def per_call(make_site, name: str, sizes: list[tuple[int, ...]] | None) -> nn.Module:
    """A site for each call in ``sizes`` (one where the zero image made at most one, or failed)."""
    if not sizes or len(sizes) == 1:
        return make_site()
    return CallSites([make_site() for _ in sizes], name, sizes)


def prepare_modules(model: nn.Module, identity: str, hist: HistogramConfig | None,
                    example: torch.Tensor | None = None) -> nn.Module:
    unshare_stateless(model)
    inputs = identity in ("all", "linear")  # (a y = x site before each Conv/Linear)
    swapped = {name: module for name, module in model.named_modules()
               if is_relu(module) or (inputs and isinstance(module, SYNAPTIC))}
    # the calls a zero image makes: the same on every torchrun rank and in load_snn's rebuild
    # (which prepares on one), whatever path the data takes (calls beyond them, or at other sizes,
    # go to the last site of their size: CallSites)
    # (two of them: at batch 1 a squeeze() would drop the batch dim)
    zeros = None if example is None else example.new_zeros((2, *example.shape[1:]))
    sizes = call_sizes(model, zeros, set(swapped))
    relus = {name for name, module in swapped.items() if is_relu(module)}
    moves = pool_moves(model, zeros, relus)
    spiking = fed_spikes(model, zeros, set(swapped) - relus, (relus - set(moves)) | set(moves.values()))
    saved = saved_sites()
    for name, module in swapped.items():
        if name in spiking and not any(site == f"{name}.0" or site.startswith(f"{name}.0.") for site in saved):
            continue
        if name in moves:  # relu -> maxpool: [y = x site ->] maxpool -> relu
            pool = model.get_submodule(moves[name])
            # (after a y = x site, not in place: its ANN-mode output is its input, which the
            # diagnostics keep as that site's output)
            moved = MovedReLU(ceiling_of(module), module.inplace and identity != "maxpool")
            site = ObservedActivation(False, hist, isinstance(pool, CHANNELS_FIRST), ceiling_of(module))
            model.set_submodule(moves[name], PooledSite(pool, site, name, moved, module.inplace))
            model.set_submodule(name, moved if identity != "maxpool" else nn.Sequential(OrderedDict(
                identity=ObservedActivation(True, hist), relu=moved)))
        elif is_relu(module):
            model.set_submodule(name, per_call(lambda: ObservedActivation(
                False, hist, ceiling=ceiling_of(module), in_place=module.inplace), name, sizes.get(name)))
        else:
            model.set_submodule(name, InputSite(per_call(lambda: ObservedActivation(
                True, hist, read_channels_first(module)), f"{name}.0", sizes.get(name)), module))
    if saved:
        as_saved(model, saved)
    if any(isinstance(module, (CallSites, MovedReLU)) for module in model.modules()):
        model.register_forward_pre_hook(restart_calls)
        model.register_forward_hook(restart_calls)
    return model


def as_saved(prepared: nn.Module, saved: frozenset[str]) -> None:
    """The sites of an SNN file written before module swapping gave a site per call and moved max
    pooling before neurons: a module's calls at one size share the site under its name, and a
    ReLU's site stays under its name, before the max pooling."""
    for name, module in list(prepared.named_modules()):
        if isinstance(module, CallSites) and name in saved and len(set(module.sizes)) == 1:
            prepared.set_submodule(name, module[0])
        elif isinstance(module, PooledSite) and module.relu_name in saved and f"{name}.relu" not in saved:
            prepared.set_submodule(name, module.pool)
            prepared.set_submodule(module.relu_name, ObservedActivation(
                False, module.relu.observer.hist, ceiling=module.moved.ceiling, in_place=module.in_place))


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
