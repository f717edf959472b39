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
        "hmt_observe_batch": ([p, i64, i64, i64, c_int, c_int, c_int, i64, p, p, c_int, p, p, *[p] * 10], c_int)})


def _layout(x: torch.Tensor, dim: int) -> tuple[int, int, int]:
    """``x`` (contiguous) as ``[outer, channels, inner]``."""
    return x.shape[:dim].numel(), x.shape[dim], x.shape[dim + 1:].numel()


def observe_batch(x: torch.Tensor, dim: int, signed: bool, hist, layer: list[torch.Tensor],
                  channel: list[torch.Tensor], hist_channel: torch.Tensor | None, hist_layer: torch.Tensor) -> bool | None:
    """Merge the batch ``x`` (channels along ``dim``) into the observer's float64 buffers
    ``layer`` (four 0-d: count, mean, M2, max) and ``channel`` (four ``[C]``) and count its output
    activation into the int64 histograms (``hist``, a HistogramConfig, gives the bins;
    ``hist_channel`` None: the layer's only), in place; return True, or False, with nothing
    merged or counted, when ``x`` holds NaN or inf; None where the kernel does not apply (off, not
    built, not a float32 CPU tensor, buffers cast by ``prepared.float()``). Counts equal the
    tensor path's; moments equal them to float64 rounding (about 1e-15 relative), not bit for bit."""
    moments = (*layer, *channel)
    if not (native.applies(x) and library() is not None) or any(
            t.dtype != torch.float64 or t.device.type != "cpu" or not t.is_contiguous() for t in moments) or any(
            t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous()
            for t in (hist_layer, *([] if hist_channel is None else [hist_channel]))):
        return None
    x = x.contiguous()
    outer, channels, inner = _layout(x, dim)
    threads, bins = torch.get_num_threads(), hist_layer.numel()
    edge, lut = octave_tables(hist.bins_per_octave)
    scratch = torch.empty(3 * channels, dtype=torch.float64)
    counts = torch.zeros(threads, bins, dtype=torch.int64)
    bad = library().hmt_observe_batch(
        x.data_ptr(), outer, channels, inner, int(signed), hist.min_exp, hist.bins_per_octave, bins,
        edge.data_ptr(), lut.data_ptr(), threads, scratch.data_ptr(), counts.data_ptr(),
        *(t.data_ptr() for t in moments), None if hist_channel is None else hist_channel.data_ptr(),
        hist_layer.data_ptr())
    return not bad

