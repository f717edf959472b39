"""The compiled CPU kernel of the observers (``observer_kernel.c``): per-channel moments, maxima and
histogram counts of a batch in one pass, merged into the observer's buffers in the same call (in
place of a float64 copy, ``var_mean``, ``amax``, ``bucketize``, a ``bincount`` the size of the
per-channel histogram whatever the batch, and some forty small tensor ops)."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import native
from .histograms import octave_tables

SOURCE = Path(__file__).with_name("observer_kernel.c")


@functools.cache
def library() -> ctypes.CDLL | None:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    return native.bind(SOURCE, "observers run", {
        "hmt_observe_batch": ([p, i64, i64, i64, i64, c_int, c_int, c_int, i64, p, p, c_int, p, p, *[p] * 10], c_int)})


def _layout(x: torch.Tensor, dim: int) -> tuple[int, int, int, int] | None:
    """``(outer, C, inner, stride)`` such that channel ``c`` of ``x`` (along ``dim``) holds the
    values ``x.data_ptr()[o * stride + c * inner + i]``, read from its strides (a contiguous
    tensor, channels last, or the heads of attention: permuted views of one projection); None
    where they do not allow it (an expanded dim, gaps inside a channel's runs)."""
    channels = x.shape[dim]
    dims = sorted((d for d in range(x.dim()) if d != dim and x.shape[d] > 1), key=x.stride)
    inner = 1
    while dims and x.stride(dims[0]) == inner:  # dense below the channels
        inner *= x.shape[dims.pop(0)]
    if channels > 1 and x.stride(dim) != inner:
        return None
    outer, stride = 1, channels * inner
    if dims:
        stride = x.stride(dims[0])
        for d in dims:  # the rest must be one run of rows
            if x.stride(d) != stride * outer:
                return None
            outer *= x.shape[d]
    return (outer, channels, inner, stride) if stride >= channels * inner else None


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def observe_batch(x: torch.Tensor, dim: int, signed: bool, hist, layer: list[torch.Tensor],
                  channel: list[torch.Tensor], counts: torch.Tensor | None) -> bool | None:
    """Merge the batch ``x`` (channels along ``dim``) into the observer's float64 buffers
    ``layer`` (four 0-d: count, mean, M2, max) and ``channel`` (four ``[C]``) and count its output
    activation into the int64 histogram ``counts``, ``[C, bins]`` per channel or ``[bins]`` for
    the layer (``hist``, a HistogramConfig, gives the bins; both None: no histogram), in place; return True, or False, with
    nothing merged or counted, when ``x`` holds NaN or inf; None where the kernel does not apply
    (off, not built, not a float32 CPU tensor, buffers cast by ``prepared.float()``). Counts equal
    the tensor path's; moments equal them to float64 rounding (about 1e-15 relative), not bit for
    bit."""
    moments = (*layer, *channel)
    if not (native.applies(x) and library() is not None) or not all(  # (is_cpu: 3x faster than device.type)
            t.dtype is torch.float64 and t.is_cpu and t.is_contiguous() for t in moments) or not (
            counts is None or counts.dtype is torch.int64 and counts.is_cpu and counts.is_contiguous()):
        return None
    layout = _layout(x, dim)
    if layout is None:
        x = x.contiguous()
        layout = _layout(x, dim)
    outer, channels, inner, stride = layout
    threads = torch.get_num_threads()
    scratch = torch.empty(3 * channels, dtype=torch.float64)
    shares = channel_counts = layer_counts = None
    bins = (0, 1, 1, None, None)  # (min_exp, bins per octave, bins, edges, lookup): unused without counts
    if counts is not None:
        if counts.shape[-1] != hist.bins or counts.numel() not in (hist.bins, channels * hist.bins):
            raise ValueError(f"histogram counts of shape {list(counts.shape)} for {hist.bins} bins and {channels} "
                             f"channels: the kernel would count past their end")
        edge, lut = octave_tables(hist.bins_per_octave)
        bins = (hist.min_exp, hist.bins_per_octave, hist.bins, edge.data_ptr(), lut.data_ptr())
        if counts.dim() == 2:
            channel_counts = counts
        else:
            layer_counts, shares = counts, torch.zeros(threads, hist.bins, dtype=torch.int64)  # each thread's counts
    bad = library().hmt_observe_batch(x.data_ptr(), outer, channels, inner, stride, int(signed), *bins, threads,
                                      scratch.data_ptr(), _pointer(shares), *(t.data_ptr() for t in moments),
                                      _pointer(channel_counts), _pointer(layer_counts))
    return not bad
