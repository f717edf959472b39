"""The compiled CPU kernel of the observers (``observer_kernel.c``): per-channel moments and maxima
in one pass, merged into the observer's buffers in the same call (in place of a float64 copy,
``var_mean``, ``amax`` and some forty small tensor ops), and the log2 bins added
straight into the histograms (in place of a dozen tensor ops and a ``bincount`` the size of the
per-channel histogram, whatever the batch)."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import native

SOURCE = Path(__file__).with_name("observer_kernel.c")


@functools.cache
def library() -> ctypes.CDLL | None:
    p, i64, c_int, c_float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    return native.bind(SOURCE, "observers run", {
        "hmt_observe_batch": ([p, i64, i64, i64, c_int, c_float, p, c_int, p, p, p, p, p, p, p, p, p], c_int),
        "hmt_histogram_add": ([p, i64, i64, i64, c_float, c_float, i64, c_int, p, p, p], None)})


def _applies(x: torch.Tensor) -> bool:
    return native.applies(x) and library() is not None


def _layout(x: torch.Tensor, dim: int) -> tuple[int, int, int]:
    """``x`` (contiguous) as ``[outer, channels, inner]``."""
    return x.shape[:dim].numel(), x.shape[dim], x.shape[dim + 1:].numel()


def observe_batch(x: torch.Tensor, dim: int, signed: bool, layer: list[torch.Tensor],
                  channel: list[torch.Tensor], floor: float) -> tuple[bool, torch.Tensor] | None:
    """Merge the batch ``x`` (channels along ``dim``) into the observer's float64 buffers
    ``layer`` (four 0-d: count, mean, M2, max) and ``channel`` (four ``[C]``), in place, and return
    (True, the output activation raised to at least ``floor``: ``max(|x|, floor)`` for a signed
    site, ``max(x, floor)`` else, contiguous, for the histograms; the same values as the tensor
    path's ``abs`` and ``clamp_min``, in the same pass as the moments); (False, ...), merging
    nothing, when ``x`` holds NaN or inf; None where the kernel does not apply (off, not built, not
    a float32 CPU tensor). Moments equal the tensor path's to float64 rounding (about 1e-15
    relative), not bit for bit."""
    buffers = (*layer, *channel)
    if not _applies(x) or any(t.dtype != torch.float64 or t.device.type != "cpu" or not t.is_contiguous()
                              for t in buffers):  # e.g. after prepared.float(), which casts them
        return None
    x = x.contiguous()
    outer, channels, inner = _layout(x, dim)
    scratch = torch.empty(3 * channels, dtype=torch.float64)
    clamped = torch.empty_like(x)
    bad = library().hmt_observe_batch(x.data_ptr(), outer, channels, inner, int(signed), floor, clamped.data_ptr(),
                                      torch.get_num_threads(), scratch.data_ptr(), *(t.data_ptr() for t in buffers))
    return not bad, clamped


def add_histograms(log2v: torch.Tensor, dim: int, min_exp: int, bins_per_octave: int,
                   hist_channel: torch.Tensor | None, hist_layer: torch.Tensor) -> bool:
    """Bin ``log2v`` (the log2 of the output activation) into the histograms as the tensor path
    of :meth:`ActivationObserver._add_histograms` does, equal count for count; False, with
    nothing added, where the kernel does not apply."""
    if not _applies(log2v) or hist_layer.device.type != "cpu":
        return False
    log2v = log2v.contiguous()
    outer, channels, inner = _layout(log2v, dim)
    bins, threads = hist_layer.numel(), torch.get_num_threads()
    scratch = torch.zeros(threads, bins, dtype=torch.int64)
    library().hmt_histogram_add(log2v.data_ptr(), outer, channels, inner, min_exp, bins_per_octave, bins, threads,
                                None if hist_channel is None else hist_channel.data_ptr(), hist_layer.data_ptr(),
                                scratch.data_ptr())
    return True
