"""Expectation compensation for float ops that see spike trains (method-facts.md, ViT recipe).

A nonlinear op F (GELU, LayerNorm, softmax, a product of two spike trains, max pooling that
could not move before its neuron, the gates of squeeze-and-excitation blocks) cannot run per
step on spikes. At step t the wrapper emits
``t*F(mean of inputs 1..t) - (t-1)*F(mean of inputs 1..t-1)``, so the running sum of its outputs
is ``t*F(running mean)``: downstream layers integrate exactly F of the inputs seen so far.
All T steps are computed in one call on ``[T*B, ...]``.

Max pooling moved before its neuron (graph.py) also gets this when its input varies over time:
the published code takes the max of each step's currents, whose running sum overestimates
``t * max(running mean)`` whenever the window's inputs fluctuate; the compensated max is exact in
expectation. (Before the first neuron the input is static and the pool runs plainly, once.)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import compensation_kernel
from .attention import Einsum, MatMul
from .multistep import TimeAware, fold, step_index, unfold
from .pooling import SlicedMaxPool2d
from .windows import Normalize


class Multiply(nn.Module):
    """``a * b`` as a module: convert swaps it in where both operands vary over time (the gates of
    squeeze-and-excitation blocks), so the product is taken of the running means."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class Divide(nn.Module):
    """``a / b`` as a module, for the same reason (ConViT normalizes attention by its row sums)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a / b


class Amax(nn.Module):
    """``x.amax(dim, keepdim)`` as a module (Hiera max-pools tokens this way): after a neuron, the
    max of the running means, like max pooling that could not move before its neuron."""

    def __init__(self, dim, keepdim: bool = False):
        super().__init__()
        self.dim, self.keepdim = dim, keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(self.dim, self.keepdim)


class Power(nn.Module):
    """``x ** exponent`` for a constant exponent (MetaFormer's StarReLU squares its ReLU)."""

    def __init__(self, exponent: float):
        super().__init__()
        self.exponent = exponent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x ** self.exponent


class VectorNorm(nn.Module):
    """``torch.linalg.vector_norm(x, p, dim, keepdim)`` as a module (ConvNeXt V2's global response
    normalization takes the 2-norm of each channel over the image): the norm of the running means."""

    def __init__(self, p: float = 2.0, dim=None, keepdim: bool = False):
        super().__init__()
        self.p, self.dim, self.keepdim = p, dim, keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x, self.p, self.dim, self.keepdim)


class InstanceNorm(nn.Module):
    """``F.instance_norm`` by each sample's own statistics as a module (the function's form of
    ``nn.InstanceNorm1d/2d/3d``, which check the input's rank): ``weight`` and ``bias`` are the
    model's, set by functional.py."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)


class Function(nn.Module):
    """A stateless function of one activation, its other arguments constants (``torch.exp(x)``,
    ``x.rsqrt()``, ``F.glu(x, -1)``: functional.py lists them), as a module."""

    def __init__(self, fn, args: tuple = (), kwargs: dict | None = None):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, tuple(args), dict(kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join([getattr(self.fn, "__name__", repr(self.fn)), *map(repr, self.args),
                          *(f"{k}={v!r}" for k, v in self.kwargs.items())])


# Module types that are wrapped when their input varies over time; extend with register_compensated.
COMPENSATED: set[type] = {nn.GELU, nn.LayerNorm, nn.Softmax, nn.LogSoftmax, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, MatMul, Einsum, Multiply,
                          Divide, Amax, Power, VectorNorm, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                          nn.ReLU6, nn.GroupNorm, SlicedMaxPool2d, Normalize, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU,
                          nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.InstanceNorm1d, nn.InstanceNorm2d,
                          nn.InstanceNorm3d, InstanceNorm, nn.RMSNorm, Function}


def register_compensated(cls: type) -> type:
    """Declare a stateless nonlinear module type safe to run under expectation compensation."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_compensated takes an nn.Module subclass, got {cls!r}")
    if issubclass(cls, (nn.Linear, nn.modules.conv._ConvNd)):
        raise ValueError(f"{cls.__name__} is a synaptic layer: spikes drive it as they are, it needs no compensation")
    COMPENSATED.add(cls)
    return cls


def running_mean(x: torch.Tensor, steps: int, inplace: bool = False) -> torch.Tensor:
    """Mean of steps 1..t at every t, in a new tensor or over ``x``: one pass of the compiled
    kernel, or a loop of T whole-step adds (on CPU, ``cumsum`` along the leading dim walks the
    tensor element by element, about 30x slower) and a division."""
    u = x if inplace else torch.empty_like(x)
    if compensation_kernel.running_mean(x, u, steps):
        return u
    x, u = unfold(x, steps), unfold(u, steps)
    if not inplace:
        u[0] = x[0]
    for t in range(1, steps):
        torch.add(u[t - 1], x[t], out=u[t])
    return fold(u.div_(step_index(steps, u)))


def step_difference(y: torch.Tensor, steps: int) -> torch.Tensor:
    """``t*y[t] - (t-1)*y[t-1]`` at every t (``y`` = F of the running means), over ``y``."""
    if compensation_kernel.step_difference(y, y, steps):
        return y
    out = unfold(y, steps)
    out.mul_(step_index(steps, out))  # t * F(mean of 1..t)
    for t in range(steps - 1, 0, -1):  # minus (t-1) * F(mean of 1..t-1), latest step first
        out[t] -= out[t - 1]
    return fold(out)


class Compensated(TimeAware):
    """``module`` under expectation compensation; ``temporal[i]`` says which positional args are
    spike trains ``[T*B, ...]`` (the others, e.g. constants, pass through unchanged),
    ``overwrite_inputs[i]`` which ones nothing else reads (their running mean is taken in place),
    ``means_given[i]`` which ones a neuron gives as running means already, and ``emits_means``
    whether the neuron it feeds takes ``F`` of the running means as they are (build.py sets them:
    each skips a pass over memory, the neuron doing the same arithmetic as it runs)."""

    def __init__(self, module: nn.Module, temporal: tuple[bool, ...] | None = None):
        super().__init__()
        self.module = module
        self.temporal = temporal
        self.overwrite_inputs: tuple[bool, ...] = ()
        self.means_given: tuple[bool, ...] = ()
        self.emits_means = False

    def forward(self, *args, **kwargs):
        flags = self.temporal or tuple(isinstance(a, torch.Tensor) for a in args)
        inplace = self.overwrite_inputs or (False,) * len(args)
        given = self.means_given or (False,) * len(args)
        means = [running_mean(a, self.steps, own) if f and not done else a
                 for a, f, own, done in zip(args, flags, inplace, given)]
        y = self.module(*means, **kwargs)
        if y._base is not None or any(y is a for a in args):  # differenced (or a neuron's) in place: a tensor of its own
            y = y.clone()
        return y if self.emits_means else step_difference(y, self.steps)
