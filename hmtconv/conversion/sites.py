"""Activation sites: where a spiking neuron goes (a ReLU, clipped or not, or a y = x identity).

In a prepared model a site is an :class:`ObservedActivation` (the float op plus an observer);
``convert`` swaps it for a :class:`SpikingActivation` holding the neuron that :func:`make_neuron`
builds, so graph editing and neuron construction stay apart.
"""
from __future__ import annotations

import torch
from torch import nn

from hmtconv.neurons import HMTNeuron, MTNeuron
from hmtconv.neurons.multilevel import MultiLevelNeuron

from ..device import KeepsDtype
from .multistep import TimeAware, fold, unfold
from .observers import ActivationObserver, HistogramConfig
from .policies import NeuronSpec


def is_relu(module: nn.Module) -> bool:
    """Modules that become unsigned sites: ``nn.ReLU``, and the clipped ReLUs ``nn.ReLU6`` and
    ``nn.Hardtanh(0, c)`` (what ``F.relu6``, ``F.hardtanh`` and ``clamp`` become, functional.py)."""
    clipped = type(module) in (nn.ReLU6, nn.Hardtanh) and module.min_val == 0 < module.max_val
    return type(module) is nn.ReLU or clipped


def ceiling_of(module: nn.Module) -> float | None:
    """Where a clipped ReLU saturates (6 for ReLU6), None for a ReLU. Its neuron's largest output,
    levels * lam, is capped there, so that the average output saturates there too."""
    return None if type(module) is nn.ReLU else float(module.max_val)


def unsigned_output(x: torch.Tensor, ceiling: float | None, in_place: bool = False) -> torch.Tensor:
    """The float op of an unsigned site: ReLU, or a ReLU clipped at ``ceiling``."""
    if in_place:
        return torch.relu_(x) if ceiling is None else x.clamp_(0.0, ceiling)
    return torch.relu(x) if ceiling is None else x.clamp(0.0, ceiling)


def float_op(site: "ObservedActivation") -> nn.Module:
    """The module a site stands for: identity, ReLU or a clipped ReLU (in place where it was)."""
    if site.signed:
        return nn.Identity()
    if site.ceiling is None:
        return nn.ReLU(inplace=site.in_place)
    return nn.Hardtanh(0.0, site.ceiling, inplace=site.in_place)


class ObservedActivation(nn.Module):
    """ReLU (``signed=False``; clipped at ``ceiling``: ReLU6, Hardtanh(0, c)) or identity
    (``signed=True``) that records its input's statistics. ``in_place``: writes its output over
    its input, as the ``nn.ReLU(inplace=True)`` it replaces did (module swapping, fallback.py;
    in a traced graph later readers of the input are rerouted instead, graph.normalize)."""

    in_place = False  # (a class default too: sites pickled before it existed)

    def __init__(self, signed: bool, hist: HistogramConfig | None = HistogramConfig(), channels_first: bool = False,
                 ceiling: float | None = None, in_place: bool = False):
        super().__init__()
        self.signed, self.ceiling, self.in_place = signed, ceiling, in_place
        self.observer = ActivationObserver(signed, hist, channels_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observer(x)
        return x if self.signed else unsigned_output(x, self.ceiling, self.in_place)

    def extra_repr(self) -> str:
        kind = "y = x" if self.signed else "ReLU" if self.ceiling is None else f"ReLU, at most {self.ceiling:g}"
        return kind + (", in place" if self.in_place else "")


def make_neuron(spec: NeuronSpec, lam: torch.Tensor, communicate: bool) -> MultiLevelNeuron:
    """The neuron for a site: H-MT (eqs. 12-21; "if" is n = 1) or the prior-work MT baseline."""
    if spec.kind == "mt":
        return MTNeuron(spec.n, lam * spec.n, signed=spec.signed)  # theta = n * lam (n levels)
    return HMTNeuron(spec.n, lam, signed=spec.signed, communicate=communicate)


class SpikingActivation(TimeAware, KeepsDtype):
    """Runs its neuron on ``[T*B, ...]`` (unfolded to ``[T, B, ...]``, the neuron loops over T).

    ``ann_mode`` makes it the float op again (ReLU or identity): the SNN then computes its ANN
    exactly, which the per-layer diagnostics compare against. With ``overwrite_input`` the output
    is written over the input tensor: a forward hook that needs the input must be a pre-hook.
    """

    KEEP_DTYPE = ("fanout",)  # synapse counts
    in_place = False  # (as ObservedActivation's)

    def __init__(self, neuron: MultiLevelNeuron, ceiling: float | None = None, in_place: bool = False):
        super().__init__()
        self.neuron, self.ceiling = neuron, ceiling  # (a clipped ReLU's ceiling, for ANN mode)
        self.in_place = in_place  # (ObservedActivation's)
        self.ann_mode = False
        # Synapses driven by each element (energy.py), a buffer so .to(device) and state_dict see it.
        self.register_buffer("fanout", None)
        # Set by convert where nothing else reads this site's input (build.py): output written over it.
        self.overwrite_input = in_place
        # Set by convert where a later in-place op writes over this site's ANN-mode output (build.py):
        # the diagnostics then keep a copy of it.
        self.output_mutated = False

    @property
    def signed(self) -> bool:
        return self.neuron.signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ann_mode:
            return x if self.signed else unsigned_output(x, self.ceiling, self.in_place)
        self.neuron.fanout = self.fanout
        u = unfold(x, self.steps)
        return fold(self.neuron(u, out=u if self.overwrite_input else None))
