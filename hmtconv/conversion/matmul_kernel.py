"""The compiled CPU kernel of attention's matrix products (``matmul_kernel.c``): ``a @ b`` over
one or two batch dims, read through the operands' strides. ``torch.matmul`` first copies a
transposed or head-split operand into a contiguous batch (the heads' layout copies of a ViT), then
calls MKL's sgemm per small matrix; the kernel reads them as they lie and sums each product in
MKL's order on attention's shapes (fused multiply-adds in k order from 0), so on the project's
CPU it equals ``torch.matmul`` bit for bit on the ViT's ``[T*B, heads, 50, 24]`` operands, in
about 0.6-0.7 of its time (on other shapes MKL may order a sum otherwise: equal to float32
rounding). Elsewhere (no AVX-512, CUDA, other dtypes, autograd, broadcast batch dims) ``matmul``
says None and the caller runs ``torch.matmul``."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import native

SOURCE = Path(__file__).with_name("matmul_kernel.c")
Strides = ctypes.c_int64 * 4


@functools.cache
def library() -> ctypes.CDLL | None:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    return native.bind(SOURCE, "attention's products run",
                       {"hmt_matmul": ([p, p, p, i64, i64, i64, i64, i64, p, p, c_int], c_int)})


def _strides(x: torch.Tensor) -> Strides:
    """(second-to-last batch dim, last batch dim, row, column) strides, a missing batch dim 0."""
    return Strides(*([0] * (4 - x.dim())), *x.stride())


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``a @ b`` (``[..., M, K] @ [..., K, N]`` with the same one or two batch dims), a new
    contiguous tensor; None where the kernel does not apply."""
    if not (a.dim() == b.dim() in (3, 4) and a.shape[:-2] == b.shape[:-2] and a.shape[-1] == b.shape[-2]
            and native.applies(a) and native.applies(b) and not torch.is_grad_enabled()) or library() is None:
        return None
    *batch, M, K = a.shape
    N = b.shape[-1]
    out = torch.empty(*batch, M, N)
    B0, B1 = batch if len(batch) == 2 else (1, batch[0])
    done = library().hmt_matmul(a.data_ptr(), b.data_ptr(), out.data_ptr(), B0, B1, M, K, N, _strides(a), _strides(b),
                                torch.get_num_threads())
    return out if done else None
