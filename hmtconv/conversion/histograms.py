"""Log2-spaced histogram bins of the observers, defined by exact edges: a value's bin is the
number of edges ``2**(min_exp + k / bins_per_octave)`` at or below it, the same on every device
and in the compiled kernel (no ``log2``, whose last-ulp rounding differs between CPUs, CUDA and
C libraries, and which put values within an ulp or so of an edge in either bin)."""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HistogramConfig:
    """Log2-spaced bins on ``[2**min_exp, 2**max_exp)``; bin 0 holds ``[0, 2**min_exp)`` and the
    last bin everything from its lower edge up.

    32 bins per octave is a 2.2 % relative bin width; quantiles interpolate inside a bin.
    ``per_channel=False`` drops the per-channel histograms (the largest buffers) when only
    layer-wise percentile thresholds are needed.
    """

    min_exp: int = -16
    max_exp: int = 16
    bins_per_octave: int = 32
    per_channel: bool = True

    def __post_init__(self):
        for name in ("min_exp", "max_exp", "bins_per_octave"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"HistogramConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
        if not isinstance(self.per_channel, bool):
            raise TypeError(f"HistogramConfig.per_channel must be True or False, got {self.per_channel!r}")
        # Edges must be normal float32 numbers (their octaves then share one mantissa table).
        if not -125 <= self.min_exp < self.max_exp <= 127:
            raise ValueError(f"HistogramConfig needs -125 <= min_exp < max_exp <= 127, got min_exp={self.min_exp}, "
                             f"max_exp={self.max_exp}")
        if not 1 <= self.bins_per_octave <= 1024:
            raise ValueError(f"HistogramConfig.bins_per_octave must be 1..1024, got {self.bins_per_octave}")

    @property
    def bins(self) -> int:
        return (self.max_exp - self.min_exp) * self.bins_per_octave + 1

    def bin_index(self, out: torch.Tensor) -> torch.Tensor:
        """Bin of each value of ``out`` (an output activation, >= 0): the number of edges at or
        below it, against edges in its own precision (float64 stays float64; lower precisions
        are exact in float32)."""
        # (bucketize copies a strided input anyway, and warns about it: attention heads are views)
        out = (out if out.dtype == torch.float64 else out.float()).contiguous()
        return torch.bucketize(out, edges(self.min_exp, self.max_exp, self.bins_per_octave, out.dtype, out.device),
                               right=True)


def ceil_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest value of ``dtype`` at or above each float64 value of ``x``."""
    near = x.to(dtype)
    return torch.where(near.to(x.dtype) < x, torch.nextafter(near, torch.full_like(near, torch.inf)), near)


@functools.cache
def octave_tables(bins_per_octave: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One octave's float32 edges, for the kernel: ``edge[j]`` (j < bins_per_octave), the mantissa
    bits of the smallest float32 at or above ``2**(j / bins_per_octave)`` (the same in every
    octave: scaling by a power of 2 is exact), ``edge[bins_per_octave] = 2**23`` (past every
    mantissa); and ``lut[i]``, how many of ``edge[1:]`` lie at or below ``i << 11``, the start of
    the i-th 1/4096 of the octave, which holds at most one edge (for up to 2,839 bins an octave)."""
    exact = torch.exp2(torch.arange(bins_per_octave, dtype=torch.float64) / bins_per_octave)
    mantissa = ceil_to(exact, torch.float32).view(torch.int32) & 0x7FFFFF
    edge = torch.cat((mantissa, torch.tensor([1 << 23], dtype=torch.int32)))
    lut = torch.searchsorted(edge[1:-1], torch.arange(4096, dtype=torch.int32) << 11, right=True).to(torch.int32)
    return edge, lut


@functools.cache
def edges(min_exp: int, max_exp: int, bins_per_octave: int, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """The ``bins - 1`` edges ``2**(min_exp + k / bins_per_octave)`` in ``dtype``: float32's from the
    kernel's octave table (so both paths bin alike), float64's from ``exp2``."""
    k = torch.arange((max_exp - min_exp) * bins_per_octave, dtype=torch.float64)
    if dtype == torch.float64:
        return torch.exp2(min_exp + k / bins_per_octave).to(device)
    mantissa = octave_tables(bins_per_octave)[0][:-1].double() / 2**23 + 1
    octave = torch.div(k, bins_per_octave, rounding_mode="floor")
    return (mantissa.repeat(max_exp - min_exp) * torch.exp2(min_exp + octave)).float().to(device)
