"""Operation counts for the energy ratio (eqs. 31-32), computed once per converted network.

What is counted, per sample:

- **Synaptic layers** are Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear. The matmuls and float
  ops of attention are not counted (the paper's eq. 32 covers neuron -> layer connections only).
- **ANN cost** ``mac_ann``: exact connections of every synaptic layer, i.e. ``sum_i c_i`` over its
  input elements, where ``c_i`` is how many (output, weight) pairs element ``i`` feeds. Padding,
  stride, dilation and groups are exact because ``c`` is the gradient of the layer run with an
  all-ones kernel on an all-ones input (padded positions feed nothing).
- **Spike-driven layers** (input reaches it from spiking neurons through structural ops only: add,
  reshape, flatten, cat, dropout, BatchNorm and average pooling): each binary spike of neuron i costs
  ``c_i`` accumulates (eq. 32), ``c_i`` summed over every layer the neuron reaches (a ResNet neuron
  feeding the next block's conv and its shortcut conv counts both). BatchNorm counts as folded into
  the next layer and average pooling as summation, so they do not change ``c``. The neurons count
  their own spikes and ``spikes * c`` (``neuron.fanout``); nothing is recomputed per step.
- **Analog-fed layers** cost MACs: a layer before the first neuron (the image enters as the same
  analog value at every step, so it runs once: ``mac_static``, counted once per inference), and a
  layer fed by float values that change over time (e.g. after a compensated op, ``mac_step``,
  counted at every step).

``E_SNN/E_ANN(t) = (E_MAC*(mac_static + t*mac_step) + E_AC*sum_{s<=t} AC[s]) / (E_MAC*mac_ann)``
with ``E_MAC = 4.6 pJ`` and ``E_AC = 0.9 pJ`` (eq. 31).
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .fold import BATCHNORMS
from .multistep import ToTime
from .sites import SpikingActivation

E_MAC, E_AC = 4.6, 0.9  # pJ (Horowitz 2014)
# Layers whose inputs meet weights: a site goes before them (identity="all") and spikes into them
# cost accumulates. (A transposed convolution scatters each input over its kernel: LowFormer.)
SYNAPTIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
            nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
# Linear rearrangements: a spike reaches what they route it to (nearest upsampling: several
# positions; a bilinear one spreads it over its interpolation weights; Unfold copies it into
# every window that holds it, Fold sums overlapping windows: VOLO's outlook attention).
REARRANGING = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.PixelUnshuffle,
               nn.ChannelShuffle, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
               nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
               nn.ReplicationPad2d, nn.ReplicationPad3d, nn.Unfold, nn.Fold)
_PASS = (nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, ToTime,
         *REARRANGING)


def connections(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer with an all-ones kernel and no bias: linear in x, ``d/dx sum(.) = c``."""
    tensors = {"weight": torch.ones_like(layer.weight, dtype=x.dtype)}
    if layer.bias is not None:
        tensors["bias"] = torch.zeros_like(layer.bias, dtype=x.dtype)
    return torch.func.functional_call(layer, tensors, (x,))


class _Probe(fx.Interpreter):
    """One structural pass (B = 1, T = 1, float64): neuron outputs are leaves, every other
    non-structural op a constant, so ``autograd`` routes exactly the synapse counts."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.device = next(iter(gm.buffers())).device
        self.leaves: dict[str, torch.Tensor] = {}
        self.ac = torch.zeros((), dtype=torch.float64, device=self.device)
        self.layers: list[tuple[str, float, bool]] = []  # (target, MACs, spike-driven?)

    def _zeros(self, node_meta) -> torch.Tensor:
        return torch.zeros(node_meta.shape, dtype=torch.float64, device=self.device)

    def placeholder(self, target, args, kwargs):
        meta = self.env_meta.meta.get("tensor_meta")
        if meta is None:  # forward's other arguments: their defaults, *args empty
            return super().placeholder(target, args, kwargs)
        return self._zeros(meta)

    def run_node(self, n: fx.Node):
        self.env_meta = n
        return super().run_node(n)

    def get_attr(self, target, args, kwargs):
        # float64 like the probe's activations, for functions that do not promote (torch.einsum)
        value = super().get_attr(target, args, kwargs)
        return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def call_module(self, target, args, kwargs):
        module = self.submodules[target]
        meta = self.env_meta.meta["tensor_meta"]
        if isinstance(module, SpikingActivation):
            self.leaves[target] = leaf = torch.ones(meta.shape, dtype=torch.float64, device=self.device,
                                                  requires_grad=True)
            return leaf
        x = args[0] if args else None
        if isinstance(module, SYNAPTIC):
            macs = connections(module, torch.ones_like(x)).sum().item()
            self.layers.append((target, macs, x.requires_grad))
            if x.requires_grad:
                self.ac = self.ac + connections(module, x).sum()
        elif isinstance(module, BATCHNORMS):
            return x
        elif isinstance(module, _PASS):
            return module(x)
        elif isinstance(module, _AVGPOOL):
            return module(x) * (x[0].numel() / module(x)[0].numel())  # sum, not mean, of the window
        return self._zeros(meta)


def count_operations(gm: fx.GraphModule, kinds: dict[fx.Node, str]) -> dict[str, float]:
    """Set ``fanout`` on every neuron and return per-sample ``mac_ann``, ``mac_static``, ``mac_step``."""
    probe = _Probe(gm)
    with torch.enable_grad():
        probe.run()
        if probe.ac.requires_grad:
            probe.ac.backward()
    for target, leaf in probe.leaves.items():
        site = gm.get_submodule(target)
        fanout = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        site.fanout = fanout[0].to(torch.float32)
    kind_of = {n.target: kinds[n] for n in gm.graph.nodes if n.op == "call_module"}
    counts = {"mac_ann": 0.0, "mac_static": 0.0, "mac_step": 0.0}
    for target, macs, spike_driven in probe.layers:
        counts["mac_ann"] += macs
        if not spike_driven:
            counts["mac_static" if kind_of[target] == "static" else "mac_step"] += macs
    return counts
