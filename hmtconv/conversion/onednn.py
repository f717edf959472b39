"""The converted network's Linear layers through oneDNN on the CPU.

An SNN runs its Linear layers on T*B rows at once. ``F.linear`` hands them to MKL's sgemm;
oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the kernel of torch.compile's CPU
backend) does the same float32 products 2-2.5x faster on the ViT's shapes on the project's AMD
EPYC (benchmarks/README.md). The two are equal bit for bit where neither splits the sum over the
inputs (up to 192 inputs on this CPU, so the MNIST ViT's results do not move), else they differ
by the float32 rounding of that sum, as any two BLAS libraries do. Off the CPU, in other dtypes,
under autograd, on a few rows (where oneDNN's fixed cost per call is more than it saves), or in a
torch without the op, the layer is ``F.linear`` as before.
"""
from __future__ import annotations

import functools
import platform

import torch
from torch import nn
from torch.nn import functional as F

# Rows below which F.linear is faster: oneDNN's call costs about 15 us, MKL's 3 (on 96 x 96)
MIN_ROWS = 256


@functools.cache
def available() -> bool:
    """The op is there, on an x86-64 CPU (where it was measured; elsewhere oneDNN may run on
    another backend than the BLAS torch uses)."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available() \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Linear):
    """``nn.Linear`` computed by oneDNN where that applies and pays: a float32 CPU input of at least
    ``MIN_ROWS`` rows, no autograd. Its parameters, hooks, ``state_dict`` and repr are those of the
    layer it was made from (:meth:`from_linear`)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Linear":
        new = cls.__new__(cls)
        new.__dict__.update(linear.__dict__)  # its parameters, hooks, mode and attributes, shared
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.float32 and self.weight.dtype is torch.float32 and x.is_cpu and self.weight.is_cpu \
                and x.numel() >= MIN_ROWS * self.in_features and not torch.is_grad_enabled() and available():
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def swap_linears(net: nn.Module) -> None:
    """Every plain ``nn.Linear`` of ``net`` (in place; subclasses, which may compute otherwise,
    stay) for :class:`Linear`, sharing its parameters."""
    for name, module in list(net.named_modules()):
        if name and type(module) is nn.Linear:
            net.set_submodule(name, Linear.from_linear(module))
