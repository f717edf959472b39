"""2-D max pooling as elementwise maxima of strided slices on CPU: the same values as
``nn.MaxPool2d``, 3-9x faster (benchmarks/README.md); other devices keep ATen's kernel.

ATen's CPU ``max_pool2d`` walks each window element by element and records argmax indices even
under ``no_grad``; ``kernel_h + kernel_w - 2`` vectorized ``torch.maximum`` calls over strided
views (rows first, then columns) compute the same maxima. NaN propagates as in ``max_pool2d``;
padding is ``-inf``, which never exceeds a window's own inputs (each window holds at least one).
``prepare`` swaps every ``nn.MaxPool2d`` of the prepared model for this, so calibration and the
SNN (which pools ``T*B`` rows at every pooling layer of a VGG) both gain; the user's ANN is untouched.
"""
from __future__ import annotations

from functools import reduce

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair


def _output_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """ATen's ``pooling_output_shape``."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    return out - 1 if ceil_mode and (out - 1) * stride >= size + pad else out


def _window_maxima(x: torch.Tensor, dim: int, kernel: int, stride: int, dilation: int, out: int) -> torch.Tensor:
    """``max_k x[..., k*dilation + i*stride, ...]`` for i < out along ``dim`` (negative)."""
    step = (..., slice(None, None, stride)) + (slice(None),) * (-dim - 1)  # every stride-th along dim

    def tap(k: int) -> torch.Tensor:
        return x.narrow(dim, k * dilation, (out - 1) * stride + 1)[step]
    first = torch.maximum(tap(0), tap(1))
    return reduce(lambda acc, k: torch.maximum(acc, tap(k), out=acc), range(2, kernel), first)


class SlicedMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, same results) computed from strided slices."""

    @classmethod
    def from_module(cls, pool: nn.MaxPool2d) -> "SlicedMaxPool2d":
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw) = _pair(self.kernel_size), _pair(self.stride)
        (ph, pw), (dh, dw) = _pair(self.padding), _pair(self.dilation)
        size = x.shape[-2:]
        if (x.device.type != "cpu" or self.return_indices or x.dim() not in (3, 4) or not x.is_floating_point()
                or kh < 2 or kw < 2 or ph > kh // 2 or pw > kw // 2):
            # ATen's kernel: on GPUs one fused kernel beats several passes; integers have no -inf to
            # pad with; and its own checks and errors
            return super().forward(x)
        oh = _output_size(size[0], kh, sh, ph, dh, self.ceil_mode)
        ow = _output_size(size[1], kw, sw, pw, dw, self.ceil_mode)
        if oh < 1 or ow < 1:
            return super().forward(x)
        # right padding so that the last window fits (ceil_mode windows may run past the input)
        rh = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - size[0] - ph)
        rw = max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - size[1] - pw)
        if ph or pw or rh or rw:
            x = F.pad(x, (pw, rw, ph, rh), value=-torch.inf)
        rows = _window_maxima(x, -2, kh, sh, dh, oh)
        return _window_maxima(rows, -1, kw, sw, dw, ow)


def slice_max_pools(model: nn.Module) -> None:
    """Swap every ``nn.MaxPool2d`` (exactly that type, not returning indices) of ``model`` for
    :class:`SlicedMaxPool2d`."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.MaxPool2d and not module.return_indices:
            model.set_submodule(name, SlicedMaxPool2d.from_module(module))
