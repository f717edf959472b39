"""Operation counts for the energy ratio (eqs. 31-32), computed once per converted network.

What is counted, per sample:

- **Synaptic layers** are Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear, and matmuls and two-operand
  einsums with one constant operand (a weight: ``x @ self.w``). The matmuls of two activations and
  the float ops of attention are not counted (the paper's eq. 32 covers neuron -> layer
  connections only).
- **ANN cost** ``mac_ann``: exact connections of every synaptic layer, i.e. ``sum_i c_i`` over its
  input elements, where ``c_i`` is how many (output, weight) pairs element ``i`` feeds. Padding,
  stride, dilation and groups are exact because ``c`` is the gradient of the layer run with an
  all-ones kernel on an all-ones input (zero padding feeds nothing; a reflected, replicated or
  circular copy of an element counts as the element).
- **Spike-driven layers** (input reaches it from spiking neurons through structural ops only: add,
  reshape, flatten, cat, dropout, BatchNorm, average pooling, means, and sums, differences and
  products with constants or static tensors): each binary spike of neuron i costs ``c_i``
  accumulates (eq. 32), ``c_i`` summed over every layer the neuron reaches (a ResNet neuron feeding
  the next block's conv and its shortcut conv counts both). Connections are counted, not weighted:
  BatchNorm and constant factors count as folded into the next layer (a constant 0 cuts the
  connection; a factor computed from the image never does), a difference as a sum, and average
  pooling and means as summation (each window that holds the spike passes it on), so none of them
  scales ``c`` (bilinear upsampling spreads a spike over its interpolation weights). The neurons
  count their own spikes and ``spikes * c`` (``neuron.fanout``); nothing is recomputed per step.
- **Analog-fed layers** cost MACs: a layer before the first neuron (the image enters as the same
  analog value at every step, so it runs once: ``mac_static``, counted once per inference), and a
  layer fed by float values that change over time (e.g. after a compensated op, ``mac_step``,
  counted at every step). A layer fed partly by spikes, partly by such floats (``fc(h + l1(h))``:
  another layer's output added to spikes, no neuron between) multiplies floats: the whole layer
  costs MACs at every step, and the spikes that reach it no accumulates (they are part of its
  float input). A part the same at every step (``fc(h + x)``, computed from the image) is
  multiplied once (its MACs in ``mac_static``) and the spikes cost accumulates as usual; a
  factor (``fc(h * x)``) scales the weights, as above, and leaves the input spikes.

``E_SNN/E_ANN(t) = (E_MAC*(mac_static + t*mac_step) + E_AC*sum_{s<=t} AC[s]) / (E_MAC*mac_ann)``
with ``E_MAC = 4.6 pJ`` and ``E_AC = 0.9 pJ`` (eq. 31).
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.nn import functional as F

from .attention import MatMul
from .fold import BATCHNORMS
from .inplace import in_place, out_of_place
from .multistep import ToTime, is_tensor
from .sites import SpikingActivation

E_MAC, E_AC = 4.6, 0.9  # pJ (Horowitz 2014)
_NONE, _STATIC, _STEP = 0, 1, 2  # the analog part of a value (_Probe._analog_part), ordered
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
# Calls the probe runs by the connections they route, not by their values (see the module docstring).
_FACTORS = {operator.mul, torch.mul, "mul", torch.addcmul, "addcmul"}
_DIVISIONS = {operator.truediv, torch.div, "div"}
# (their alpha, a constant factor, dropped too)
_AS_ADDITION = {operator.sub: operator.add, torch.sub: torch.add, "sub": "add", torch.add: torch.add, "add": "add"}
_AS_INPUT = {operator.neg, torch.neg, "neg", torch.detach, "detach"}  # negated or detached: the same routes
_MEANS = {torch.mean, "mean"}
_POOL_FUNCTIONS = {F.avg_pool1d: nn.AvgPool1d, F.avg_pool2d: nn.AvgPool2d, F.avg_pool3d: nn.AvgPool3d,
                   F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d, F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
                   F.adaptive_avg_pool3d: nn.AdaptiveAvgPool3d}


def _window_sizes(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """Window lengths of adaptive pooling along one dim: output i averages inputs
    floor(i * size_in / size_out) .. ceil((i + 1) * size_in / size_out) - 1."""
    i = torch.arange(size_out, device=device)
    return (((i + 1) * size_in + size_out - 1) // size_out - i * size_in // size_out).double()


def _adaptive_sum(out: torch.Tensor, x: torch.Tensor, dims: int) -> torch.Tensor:
    """Adaptive average pooling ``out`` of ``x`` over its last ``dims`` dims, times each window's size."""
    area = torch.ones((), dtype=torch.float64, device=out.device)  # (unsqueezed, no longer a scalar)
    for d in range(-dims, 0):
        sizes = _window_sizes(x.shape[d], out.shape[d], out.device)
        area = area.unsqueeze(-1) * sizes
    return out * area


def _window_sum(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Average pooling as the sum of each window (padding adds nothing)."""
    if isinstance(pool, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return _adaptive_sum(pool(x), x, int(type(pool).__name__[-2]))
    if isinstance(pool, nn.AvgPool1d):  # avg_pool1d has no divisor_override: the 2-d pool on a row
        return F.avg_pool2d(x.unsqueeze(-2), (1, *pool.kernel_size), (1, *pool.stride), (0, *pool.padding),
                            pool.ceil_mode, divisor_override=1).squeeze(-2)
    avg_pool = F.avg_pool2d if isinstance(pool, nn.AvgPool2d) else F.avg_pool3d
    return avg_pool(x, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, divisor_override=1)


def _connections_only(target, args: tuple, kwargs: dict) -> tuple:
    """The call as the probe runs it where a spike-derived tensor enters it: constant factors
    as 1 (0 stays 0), divisors as 1, differences as sums."""
    def nonzero(a):
        if isinstance(a, torch.Tensor):
            return a if a.requires_grad else (a != 0).to(torch.float64)
        return float(a != 0) if isinstance(a, (int, float)) and not isinstance(a, bool) else a
    if target in _FACTORS:
        return target, tuple(nonzero(a) for a in args), {k: nonzero(v) for k, v in kwargs.items()}
    if target in _DIVISIONS:
        divisor = args[1]
        one = torch.ones_like(divisor) if isinstance(divisor, torch.Tensor) else 1.0
        return target, (args[0], one, *args[2:]), {k: v for k, v in kwargs.items() if k != "rounding_mode"}
    if target in _AS_ADDITION:
        return _AS_ADDITION[target], args, {k: v for k, v in kwargs.items() if k != "alpha"}
    return target, args, kwargs


def connections(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer with an all-ones kernel and no bias: linear in x, ``d/dx sum(.) = c``."""
    tensors = {"weight": torch.ones_like(layer.weight, dtype=x.dtype)}
    if layer.bias is not None:
        tensors["bias"] = torch.zeros_like(layer.bias, dtype=x.dtype)
    return torch.func.functional_call(layer, tensors, (x,))


class _Probe(fx.Interpreter):
    """One structural pass (B = 1, T = 1, float64): neuron outputs are leaves, the ops between
    them and the layers run by their connections (see the module docstring), every other op is a
    constant, so ``autograd`` routes exactly the synapse counts."""

    def __init__(self, gm: fx.GraphModule, kinds: dict[fx.Node, str], data: set[fx.Node]):
        super().__init__(gm)
        self.kinds = kinds
        self.data = data  # the nodes computed from the image's values (zeros here, not the data's)
        self.device = next(iter(gm.buffers())).device
        self.leaves: dict[str, torch.Tensor] = {}
        self.ac = torch.zeros((), dtype=torch.float64, device=self.device)
        # per call, not per module: one called on the image and on spikes is static once, temporal once
        self.layers: list[tuple[str | None, float]] = []  # (where its MACs count in the SNN, if anywhere; MACs)
        self.analog: dict[fx.Node, int] = {}  # see _analog_part

    def _zeros(self, node_meta) -> torch.Tensor:
        return torch.zeros(node_meta.shape, dtype=torch.float64, device=self.device)

    def placeholder(self, target, args, kwargs):
        meta = self.env_meta.meta.get("tensor_meta")
        if meta is None:  # forward's other arguments: their defaults, *args empty
            return super().placeholder(target, args, kwargs)
        return self._zeros(meta)

    def run_node(self, n: fx.Node):
        self.env_meta = n
        out = super().run_node(n)
        self.analog[n] = self._analog_part(n)
        return out

    def _analog_part(self, n: fx.Node) -> int:
        """What float values that are not spikes ``n``'s value holds: none, the same at every step
        (the image's, repeated over the steps), or changing from step to step (a layer's or a
        compensated op's output, summed into it)."""
        if n.op == "call_module":
            module = self.submodules[n.target]
            if isinstance(module, ToTime):
                return _STATIC if n.args[0] in self.data else _NONE
            if isinstance(module, SpikingActivation) or self.kinds.get(n) != "temporal":
                return _NONE
            if not isinstance(module, (*BATCHNORMS, *_PASS, *_AVGPOOL)):  # a layer or a float op of its own
                return _STEP
        elif n.op not in ("call_function", "call_method"):
            return _NONE
        inputs = [a for a in n.all_input_nodes if is_tensor(a)]
        if n.target in _FACTORS or n.target in _DIVISIONS:  # a spike scaled by a factor stays a spike
            spikes = [a for a in inputs if getattr(self.env.get(a), "requires_grad", False)]
            inputs = spikes or inputs
        return max((self.analog.get(a, _NONE) for a in inputs), default=_NONE)

    def get_attr(self, target, args, kwargs):
        # float64 like the probe's activations, for functions that do not promote (torch.einsum);
        # detached: a parameter is a constant here, and requires_grad marks what spikes reach
        value = super().get_attr(target, args, kwargs)
        return value.detach().double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def _call(self, target, args: tuple, kwargs: dict, run):
        """A function or method call, by its connections where spikes reach it. In-place calls
        (``x.mul_(2)``) run out of place, their result then read as ``x`` by later
        nodes: autograd keeps what layers that read ``x`` before saved."""
        writes = in_place(target)
        out = self._routed(out_of_place(target) if writes else target, args, kwargs, run)
        if writes and isinstance(self.env_meta.args[0], fx.Node):
            self.env[self.env_meta.args[0]] = out
        return out

    def _routed(self, target, args: tuple, kwargs: dict, run):
        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values())):
            return run(target, args, kwargs)
        if target in _AS_INPUT:
            return args[0]
        if target in _POOL_FUNCTIONS:  # as the module, whose arguments come in the same order
            return _window_sum(_POOL_FUNCTIONS[target](*args[1:], **kwargs), args[0])
        if target in _FACTORS:
            args, kwargs = self._data_as_ones(args, kwargs)
        out = run(*_connections_only(target, args, kwargs))
        return out * (args[0].numel() / out.numel()) if target in _MEANS else out  # (B = 1) a sum

    def _data_as_ones(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Factors computed from the image as ones: a spike scaled by the data reaches what follows
        (their values here come from a zero image, and a zero would cut the connection)."""
        def one(node, value):
            data = isinstance(node, fx.Node) and node in self.data
            return torch.ones_like(value) if data and isinstance(value, torch.Tensor) and not value.requires_grad \
                else value
        node = self.env_meta
        return tuple(map(one, node.args, args)), {k: one(node.kwargs[k], v) for k, v in kwargs.items()}

    def call_function(self, target, args, kwargs):
        return self._call(target, args, kwargs, super().call_function)

    def call_method(self, target, args, kwargs):
        return self._call(target, args, kwargs, super().call_method)

    def _layer(self, layer, x: torch.Tensor, source: fx.Node) -> None:
        """A synaptic layer ``layer(x)`` (linear in x, all-ones weights) reading ``source``: its
        MACs, and the accumulates of spikes that reach it unless floats that change from step to
        step reach it too (it multiplies floats then: MACs at every step)."""
        analog = self.analog.get(source, _NONE)
        if x.requires_grad and analog != _STEP:
            self.ac = self.ac + layer(x).sum()
            cost = "mac_static" if analog == _STATIC else None  # (the image's part: multiplied once)
        else:
            cost = "mac_static" if self.kinds[self.env_meta] == "static" else "mac_step"
        self.layers.append((cost, layer(torch.ones_like(x)).sum().item()))

    def call_module(self, target, args, kwargs):
        module = self.submodules[target]
        meta = self.env_meta.meta["tensor_meta"]
        if isinstance(module, SpikingActivation):
            self.leaves[target] = leaf = torch.ones(meta.shape, dtype=torch.float64, device=self.device,
                                                  requires_grad=True)
            return leaf.clone()  # (not the leaf itself: a method may scale it in place)
        x = args[0] if args else None
        if isinstance(module, SYNAPTIC):
            self._layer(lambda v: connections(module, v), x, self.env_meta.args[0])
        elif isinstance(module, MatMul):  # Einsum too; the product of two activations is Compensated
            constant = [self.kinds.get(a) == "const" for a in self.env_meta.args]
            if constant.count(True) == 1:  # x @ weight
                ones = [torch.ones_like(a) for a in args]
                at = constant.index(False)
                self._layer(lambda v: module(*ones[:at], v, *ones[at + 1:]), args[at], self.env_meta.args[at])
        elif isinstance(module, BATCHNORMS):
            return x
        elif isinstance(module, _PASS):
            return module(x)
        elif isinstance(module, _AVGPOOL):
            return _window_sum(module, x)
        return self._zeros(meta)


def count_operations(gm: fx.GraphModule, kinds: dict[fx.Node, str], data: set[fx.Node]) -> dict[str, float]:
    """Set ``fanout`` on every neuron and return per-sample ``mac_ann``, ``mac_static``, ``mac_step``;
    ``data``: the nodes computed from the values of the image (graph.reads_input)."""
    probe = _Probe(gm, kinds, data)
    with torch.enable_grad():
        probe.run()
        if probe.ac.requires_grad:
            probe.ac.backward()
    for target, leaf in probe.leaves.items():
        site = gm.get_submodule(target)
        fanout = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        site.fanout = fanout[0].to(torch.float32)
    counts = {"mac_ann": 0.0, "mac_static": 0.0, "mac_step": 0.0}
    for cost, macs in probe.layers:
        counts["mac_ann"] += macs
        if cost is not None:
            counts[cost] += macs
    return counts
