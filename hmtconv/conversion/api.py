"""The verbs, in the style of torch.ao.quantization: ``prepare`` -> ``calibrate`` -> ``convert``.

``prepare`` inserts observed sites, ``calibrate`` runs data through them (statistics only, in
buffers), ``convert`` turns statistics into thresholds and builds the SNN. ``prepare`` and
``convert`` work on a copy unless ``inplace=True`` (``calibrate`` fills the prepared model's
buffers); one calibration serves any n, T, policy, neuron and granularity.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from .. import distributed
from ..allocator import gc_paused
from ..device import placement
from .attention import decompose_attention
from .batches import check_loader, first_batches, model_input, one_sample_hint
from .build import build_snn
from .fallback import drop_unreached_sites, prepare_modules
from .graph import NotTraceable, prepare_graph
from .huggingface import is_hugging_face, return_logits
from .observers import ActivationObserver, HistogramConfig, ShapeObserver, check_finite
from .onednn import swap_linears
from .policies import histograms_for
from .pooling import slice_max_pools
from .sites import ObservedActivation, SpikingActivation
from .snn import IDENTITIES, SNN, ConversionConfig, ConversionReport
from .tracing import HOOKS_DROPPED, hooked
from .unconverted import find_unconverted
from .windows import decompose_window_attention


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def observed_sites(model: nn.Module) -> dict[str, ObservedActivation]:
    """Observed sites by qualified name, in execution order where a traced graph tells it."""
    names = [node.target for node in model.graph.nodes if node.op == "call_module"] \
        if isinstance(model, fx.GraphModule) else []
    names += [name for name, _ in model.named_modules()]
    return {name: model.get_submodule(name) for name in dict.fromkeys(names)
            if isinstance(model.get_submodule(name), ObservedActivation)}


@dataclass
class PrepareInfo:
    """Plain data kept on a prepared model (in ``GraphModule.meta``, which copies keep)."""

    identity: str
    traced: bool
    trace_error: str | None = None
    sized_to: tuple[int, ...] | None = None  # the image shape a graph traced at one size takes (tracing.py)
    unconverted: list[tuple[str, str]] = field(default_factory=list)
    probed: bool = False  # a module-swapped model's first batch looked for unconverted functions


_KEY = "hmtconv_prepare"
INPUT_SHAPE = "hmtconv_input_shape"  # a ShapeObserver of the images (its state_dict carries their shape)


def _info(model: nn.Module) -> PrepareInfo | None:
    return model.meta.get(_KEY) if isinstance(model, fx.GraphModule) else getattr(model, _KEY, None)


def is_prepared(model: nn.Module) -> bool:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if _info(model) is None and any(isinstance(m, ObservedActivation) for m in model.modules()):
        raise TypeError(f"{type(model).__name__} has observers but not the record prepare() keeps beside them (a "
                        f"prepared GraphModule saved whole loses it): save prepared.state_dict() instead, and load "
                        f"it into prepare(model) of the same model and arguments")
    return _info(model) is not None


def input_shape(prepared: nn.Module) -> tuple[int, ...] | None:
    """The image shape calibration saw (None before any batch)."""
    return getattr(prepared, INPUT_SHAPE).shape


def swap_faster_layers(model: nn.Module) -> None:
    """The same values, faster on CPU, in place: max pooling by strided slices (3-9x, pooling.py),
    Linear layers by oneDNN (2-2.5x, onednn.py). ``prepare`` does it, so calibration and the SNN
    both gain; the benchmarks give their ANN the same to show those gains apart."""
    slice_max_pools(model)
    swap_linears(model)


def prepare(model: nn.Module, *, identity: str = "none", inplace: bool = False,
            histogram: HistogramConfig | None = HistogramConfig(), example_inputs=None) -> nn.Module:
    """Insert observed sites (ReLUs, and the y = x sites that ``identity`` asks for).

    ``histogram=None`` gathers moments and maxima only (enough for opt, opt1500 and max; the
    percentile policies and opt-emp then refuse the calibration).

    ``example_inputs`` (a batch of images, or ``(images, labels)``) lets fx trace a model whose
    forward branches on sizes (timm's MobileViT, Twins, NesT...) at that image size; without it,
    or where even that fails, such a model falls back to module swapping, where a ReLU module gets
    a site per call that a zero image of the example's size makes (without it, one site).

    ``inplace`` edits the model's own modules instead of a copy's; use the module returned (a
    traced model's is a new GraphModule around them)."""
    if identity not in IDENTITIES:
        raise ValueError(f"identity must be one of {IDENTITIES}, got {identity!r}")
    if isinstance(model, SNN) or is_prepared(model):
        raise TypeError(f"prepare expects the float model, got an already {'converted' if isinstance(model, SNN) else 'prepared'} {type(model).__name__}")
    _check_images_alone(model)
    if model.training:
        warnings.warn(f"{type(model).__name__} was in training mode; converting it in eval mode (BatchNorm "
                      f"running statistics, no dropout)", stacklevel=2)
    model = (model if inplace else _copy(model)).eval()
    if is_hugging_face(model):
        return_logits(model)
    hooks = [name for name, m in model.named_modules() if hooked(m)]
    fix_parametrizations(model)
    decompose_attention(model)
    decompose_window_attention(model)
    example = None if example_inputs is None else model_input(example_inputs, *placement(model), "example_inputs")
    try:
        (prepared, sized), traced, trace_error = prepare_graph(model, identity, histogram, example), True, None
    except NotTraceable as error:  # swap modules instead (fallback.py)
        prepared, sized, traced, trace_error = (prepare_modules(model, identity, histogram, example), False, False,
                                                str(error))
    swap_faster_layers(prepared)
    if hooks:
        failed = prepared.meta.pop(HOOKS_DROPPED, []) if traced else []
        _warn_hooks(hooks, {name for name, m in prepared.named_modules() if hooked(m)}, failed)
    if not any(isinstance(m, ObservedActivation) for m in prepared.modules()):
        if not traced:
            raise ValueError(f"{type(model).__name__}: torch.fx cannot trace it ({trace_error}), and without a graph "
                             f"only ReLU modules (nn.ReLU, ReLU6, Hardtanh(0, c)) become neurons (and with "
                             f"identity='all', the inputs of Conv and Linear modules): it has none. Make its forward "
                             f"traceable (the error says where) or use such modules")
        raise ValueError(f"{type(model).__name__} has no ReLU (nor ReLU6 or Hardtanh(0, c)) to convert (and "
                         f"identity={identity!r} adds no y = x site); use identity='all' for networks without ReLU "
                         f"such as ViT")
    info = PrepareInfo(identity, traced, trace_error, sized_to=tuple(example.shape[1:]) if sized else None)
    device = placement(prepared)[0]
    for site in observed_sites(prepared).values():  # made on the CPU: they would copy every activation there
        site.to(device)
    prepared.add_module(INPUT_SHAPE, ShapeObserver().to(device))
    if traced:
        prepared.meta[_KEY] = info
    else:
        setattr(prepared, _KEY, info)
    return prepared


def _check_images_alone(model: nn.Module) -> None:
    """The SNN is called on the images alone (``model(x)``): a forward that cannot take them so is
    refused here (calibration failed with forward's own TypeError, the trace of one taking
    ``*inputs`` deep inside). A decorated forward is refused only where neither its own signature
    nor the decorator's (which may supply arguments, or pass ``*args`` on) takes them."""
    name = f"{type(model).__name__}.forward"
    problems = [_images_alone(inspect.signature(model.forward, follow_wrapped=wrapped), name)
                for wrapped in (True, False)]
    if all(problems):
        raise TypeError(f"{problems[0]}; hmtconv converts models called on the images alone (model(images)): wrap "
                        f"it in an nn.Module whose forward(images) calls it")


def _images_alone(signature: inspect.Signature, name: str) -> str | None:
    """What keeps ``signature`` from taking the images alone as its first argument, or None."""
    kinds = inspect.Parameter
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD):
        return f"{name}{signature} takes no images as its first argument"
    needed = [p.name for p in parameters[1:]
              if p.default is kinds.empty and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]
    return f"{name} needs {', '.join(needed)} besides the images" if needed else None


def _warn_hooks(hooks: list[str], kept: set[str], failed: list[str]) -> None:
    def listed(names: list[str]) -> str:
        names = [name or "<root>" for name in names]
        return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    copied = [n for n in hooks if n in kept]
    traced = [n for n in hooks if n not in kept and n not in failed]
    said = [f"forward hooks on {listed(copied)} are copied with the model: they see calibration batches and the "
            f"SNN's [T*B, ...] activations (a hooked BatchNorm is not folded)"] if copied else []
    if traced:
        said.append(f"forward hooks on {listed(traced)} do not run as hooks: on the model itself and the blocks the "
                    f"trace runs through they were traced into the graph (what they compute into the outputs kept); "
                    f"on the ReLU, attention and max-pooling modules the conversion replaces, dropped")
    if failed:
        said.append(f"a forward hook on {listed(failed)} fails the trace (it reads values, as a logger's float(out) "
                    f"does) and was dropped")
    warnings.warn("; ".join(said), stacklevel=3)


def fix_parametrizations(model: nn.Module) -> None:
    """Parametrized weights (weight_norm and the like) become the plain tensors they compute."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            # (removal edits the module's class, which a deep copy shares with the original's)
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name)


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except RuntimeError as error:  # torch's deepcopy of non-leaf tensors, e.g. nn.utils.weight_norm's
        raise ValueError(f"{type(model).__name__} cannot be copied ({one_line(error)[:120]}...); with "
                         f"torch.nn.utils.weight_norm, call torch.nn.utils.remove_weight_norm on its layers first (or "
                         f"use torch.nn.utils.parametrizations.weight_norm)") from error


@torch.no_grad()
def calibrate(prepared: nn.Module, loader: Iterable, *, max_batches: int | None = None) -> nn.Module:
    """Run ``(inputs, labels)`` batches through the observers (in place; statistics accumulate).

    Under torchrun each rank passes its own share of the data; the statistics of every rank are
    then merged on every rank, so all ranks convert with the thresholds of the whole data
    (``max_batches`` then counts each rank's batches).
    """
    if not is_prepared(prepared):
        raise TypeError(f"calibrate expects the output of prepare(), got {type(prepared).__name__}")
    prepared.eval()
    device, dtype = placement(prepared)
    info = _info(prepared)
    sites = observed_sites(prepared)
    earlier = {name: site.observer for name, site in sites.items()}
    if distributed.active():  # this call's data goes to fresh observers, merged with the other ranks' below
        for site in sites.values():
            site.observer = _empty_like(site.observer)
    seen = 0
    for name, site in sites.items():  # named in the error about non-finite activations
        site.observer.label = name or "<root>"
    for i, batch in enumerate(first_batches(loader, max_batches, "calibrate")):
        x = model_input(batch, device, dtype, f"calibration batch {i}")
        if x.shape[0] == 0:  # (an empty batch holds no statistics; evaluate skips them too)
            continue
        if info.sized_to is not None and tuple(x.shape[1:]) != info.sized_to:
            raise ValueError(f"calibration batch {i} has images of shape {list(x.shape[1:])} but "
                             f"{type(prepared).__name__} was traced at {list(info.sized_to)} (its forward branches "
                             f"on sizes, or a module takes one from the input); prepare it with example_inputs of "
                             f"the calibration size")
        try:
            if not info.traced and not info.probed:  # this first run also feeds the observers
                (info.unconverted, out), info.probed = find_unconverted(prepared, x), True
            else:
                with gc_paused():
                    out = prepared(x)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"{type(prepared).__name__} returns {type(out).__name__}, not a tensor of logits; "
                                f"convert a module whose forward returns the logits alone (e.g. model(x)[0])")
        except Exception as error:  # a shape or dtype the model cannot take, in torch's words
            hint = one_sample_hint(batch)  # (then any error: BatchNorm's "expected 4D input" is a ValueError)
            if not (hint or isinstance(error, RuntimeError)):
                raise
            raise ValueError(f"the model cannot run calibration batch {i} of shape {list(x.shape)}: "
                             f"{one_line(error)}{hint}") from error
        getattr(prepared, INPUT_SHAPE)(x)
        check_finite([site.observer for site in sites.values()])
        seen += 1
    if distributed.active():
        seen = _merge_ranks(prepared, sites, earlier, info, seen)
    if seen == 0:
        raise ValueError("calibration loader yielded no batches (is the calibration set empty?)")
    return prepared


def _empty_like(observer: ActivationObserver) -> ActivationObserver:
    return ActivationObserver(observer.signed, observer.hist, observer.channels_first).to(observer.count.device)


def _merge_ranks(prepared: nn.Module, sites: dict[str, ObservedActivation], earlier: dict[str, ActivationObserver],
                 info: PrepareInfo, seen: int) -> int:
    """Fold every rank's statistics of this call into ``earlier`` in rank order, identically on every
    rank (Chan's merge for count/mean/M2, max of maxima, summed histograms); returns the batches
    seen by all ranks. A rank with no data contributes nothing."""
    mine = {"seen": seen, "input_shape": input_shape(prepared), "unconverted": info.unconverted,
            "observers": {name: {k: v.cpu() for k, v in site.observer.state_dict().items()}
                          for name, site in sites.items()}}
    ranks = distributed.all_gather_objects(mine)
    for name, site in sites.items():
        merged = earlier[name]
        for rank in ranks:
            state = rank["observers"][name]
            part = ActivationObserver(merged.signed, merged.hist, merged.channels_first)
            part.load_state_dict(state)
            merged.merge(part.to(merged.count.device))
        site.observer = merged
    if input_shape(prepared) is None:  # this rank had no data: take the shape (and fallback report) of one that had
        first = next((rank for rank in ranks if rank["input_shape"] is not None), None)
        if first is not None:
            getattr(prepared, INPUT_SHAPE)(torch.empty(0, *first["input_shape"]))
            info.unconverted = first["unconverted"]
    return sum(rank["seen"] for rank in ranks)


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
    elif not isinstance(model, SNN) and any(isinstance(m, SpikingActivation) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} holds spiking neurons: it was converted in place already "
                         f"(convert(prepared, inplace=True) makes it the SNN's network); prepare the float model "
                         f"again, or convert without inplace to keep the prepared model")
    elif calib_loader is None:
        raise ValueError("convert(model, calib_loader, ...) needs calibration data for a float model "
                         "(or pass the output of prepare() and calibrate())")
    else:
        check_loader(calib_loader, "convert")
        first, calib_loader = _peek(calib_loader)
        # gather only what this conversion reads: the histograms cost more than everything else
        prepared = prepare(model, identity=identity, inplace=inplace,
                           histogram=histograms_for([policy], per_channel=granularity == "channel"),
                           example_inputs=_example_of_any_rank(first, model))
    if calib_loader is not None:
        calibrate(prepared, calib_loader)
    info, shape = _info(prepared), input_shape(prepared)
    if shape is None:
        raise ValueError("the prepared model has no calibration data: run calibrate(prepared, loader) first")
    unreached = [] if info.traced else drop_unreached_sites(prepared, observed_sites(prepared))
    sites = observed_sites(prepared)  # (those reached)
    _warn_constant(sites, per_channel=config.granularity == "channel")
    _warn_outside_histograms(sites)
    report = ConversionReport(shape, info.traced, [*info.unconverted, *unreached], info.trace_error)
    delattr(prepared, INPUT_SHAPE)
    if info.traced:
        del prepared.meta[_KEY]
    else:
        delattr(prepared, _KEY)
    return build_snn(prepared, config, report)


def _peek(loader: Iterable) -> tuple[object | None, Iterable]:
    """The first batch of ``loader`` and an iterable that still yields every batch (one pass over
    the loader, so a generator works and a DataLoader's workers start once)."""
    batches = iter(loader)
    first = next(batches, None)
    return first, ([] if first is None else itertools.chain([first], batches))


def _example_of_any_rank(batch, model: nn.Module):
    """The images of ``batch`` (None: no data), checked as calibration batch 0; under torchrun a
    rank without data gets zeros of the size another rank's images have, so every rank traces
    the same graph (tracing.py)."""
    device, dtype = placement(model)
    images = None if batch is None else model_input(batch, device, dtype, "calibration batch 0")
    if not distributed.active():
        return images
    shapes = distributed.all_gather_objects(None if images is None else tuple(images.shape[1:]))
    shape = next((s for s in shapes if s is not None), None)
    return images if images is not None or shape is None else torch.zeros((1, *shape), device=device, dtype=dtype)


def _warn_outside_histograms(sites: dict[str, ObservedActivation]) -> None:
    """Activations at or above the histograms' top edge share one open bin, and a site whose
    activations all lie below the bottom edge has them all in bin 0: percentiles are interpolated
    inside one bin and opt-emp is coarse there; say where, and how to widen the range."""
    hist = next(iter(sites.values())).observer.hist if sites else None
    if hist is None:
        return
    tops = {name: float(site.observer.max) for name, site in sites.items()}
    above = [name for name, top in tops.items() if top >= 2.0 ** hist.max_exp]
    below = [name for name, top in tops.items() if 0 < top < 2.0 ** hist.min_exp]
    if above:
        top = max(tops[name] for name in above)
        warnings.warn(f"activations up to {top:.3g} at {', '.join(above)}, beyond the histograms' range "
                      f"(2**{hist.max_exp}): percentile policies and opt-emp lose precision there; "
                      f"prepare(model, histogram=HistogramConfig(max_exp={math.ceil(math.log2(top)) + 1})) widens it",
                      stacklevel=3)
    if below:
        low = min(tops[name] for name in below)  # 8 octaves under the smallest largest value: 256 bins
        warnings.warn(f"activations all below the histograms' range (2**{hist.min_exp}) at {', '.join(below)} "
                      f"(largest {low:.3g}{' or more' if len(below) > 1 else ''}): percentile policies and opt-emp see "
                      f"one bin there; prepare(model, histogram=HistogramConfig(min_exp="
                      f"{math.floor(math.log2(low)) - 8})) widens it", stacklevel=3)


def _warn_constant(sites: dict[str, ObservedActivation], per_channel: bool) -> None:
    """Sites whose input never varied in calibration (sigma = 0: a dead or constant unit) still get
    finite thresholds, but the data probably did not exercise them; say which."""
    found = []
    for name, site in sites.items():
        mean, std = site.observer.moments(per_channel)
        constant = (std <= 1e-12 * mean.abs()).reshape(-1)  # 0, or the float64 rounding of a constant's mean
        if constant.any():
            found.append(name + (f" ({int(constant.sum())} of {constant.numel()} channels)" if per_channel else ""))
    if found:
        warnings.warn(f"constant activations (sigma = 0) at {', '.join(found)}: their thresholds come from the "
                      f"constant value alone; calibrate on more or more varied images if that is unexpected",
                      stacklevel=3)
