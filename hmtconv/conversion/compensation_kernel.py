"""The compiled CPU kernel of expectation compensation (``compensation_kernel.c``): the running
mean of the inputs and the step difference of the outputs in one pass each, in place of T
whole-step adds and a division, and of a multiplication and T subtractions (each a separate ATen
call over memory, with Python indexing in between). Equal to the tensor path bit for bit."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import native

SOURCE = Path(__file__).with_name("compensation_kernel.c")
RUNNING_MEAN, STEP_DIFFERENCE = 0, 1


@functools.cache
def library() -> ctypes.CDLL | None:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    return native.bind(SOURCE, "compensated ops run", {"hmt_compensate": ([p, p, i64, i64, c_int, c_int], None)})


def _run(mode: int, src: torch.Tensor, dst: torch.Tensor, steps: int) -> bool:
    if not (native.applies(src) and src.shape[0] % steps == 0 and dst.dtype == torch.float32
            and src.stride() == dst.stride() and native.memory_order(src, 1) is not None) or library() is None:
        return False  # (a batch that T does not divide: the tensor path's reshape says so)
    # dim 0 (time-major T*B rows) outermost in memory: each step is one block of numel / T elements
    library().hmt_compensate(src.data_ptr(), dst.data_ptr(), steps, src.numel() // steps, mode, torch.get_num_threads())
    return True


def running_mean(x: torch.Tensor, u: torch.Tensor, steps: int) -> bool:
    """``u`` (``x`` itself, or a tensor laid out like it) = the mean of steps 1..t at every t;
    False, with nothing written, where the kernel does not apply."""
    return _run(RUNNING_MEAN, x, u, steps)


def step_difference(y: torch.Tensor, out: torch.Tensor, steps: int) -> bool:
    """``out`` (``y`` itself, or laid out like it) = ``t*y[t] - (t-1)*y[t-1]`` at every t; False,
    with nothing written, where the kernel does not apply."""
    return _run(STEP_DIFFERENCE, y, out, steps)
