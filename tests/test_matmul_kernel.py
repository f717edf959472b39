"""The compiled kernel of attention's matrix products (matmul_kernel.py): within float32 rounding
of the exact product on every layout it reads in place, None (so torch.matmul) where it does not
apply, and the MatMul module's path on CPU."""
import ctypes
import shutil

import pytest
import torch

from hmtconv import native
from hmtconv.conversion import matmul_kernel
from hmtconv.conversion.attention import MatMul



def built() -> bool:
    with torch.no_grad():
        return matmul_kernel.matmul(torch.ones(1, 1, 1), torch.ones(1, 1, 1)) is not None


pytestmark = pytest.mark.skipif(not built(), reason="the kernel is not built here (no AVX-512 or no compiler)")


def within_rounding(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """|c - a b| within the float32 error bound of a K-term sum of products, K * 2^-24 / (1 - K * 2^-24)
    times the sum of the terms' magnitudes (Higham's gamma_K)."""
    exact, magnitude = a.double() @ b.double(), a.double().abs() @ b.double().abs()
    terms = a.shape[-1] * 2.0**-24
    return bool(((c.double() - exact).abs() <= terms / (1 - terms) * magnitude).all())


def heads(batch, tokens, heads, width):
    """Three head-split views of one projection ``[batch, tokens, 3 * heads * width]``, as attention makes them."""
    projection = torch.randn(batch, tokens, 3 * heads * width)
    return [p.unflatten(-1, (heads, width)).transpose(1, 2) for p in projection.chunk(3, -1)]


def cases():
    torch.manual_seed(0)
    q, k, v = heads(6, 50, 4, 24)
    probs = torch.softmax(torch.randn(6, 4, 50, 50), -1)
    return {
        "scores (k transposed)": (q, k.transpose(-2, -1)),
        "mix": (probs, v),
        "contiguous 3-d": (torch.randn(5, 7, 9), torch.randn(5, 9, 11)),
        "many column blocks": (torch.randn(3, 2, 13, 20), torch.randn(3, 2, 20, 130)),
        "columns a multiple of 16": (torch.randn(4, 5, 64), torch.randn(4, 64, 32)),
        "one column, one row, one term": (torch.randn(2, 3, 1, 1), torch.randn(2, 3, 1, 1)),
        "a transposed": (torch.randn(4, 3, 9, 6).transpose(-2, -1), torch.randn(4, 3, 9, 17)),
    }


@pytest.mark.parametrize("case", list(cases()))
def test_kernel_is_the_product_to_float32_rounding(case):
    a, b = cases()[case]
    with torch.no_grad():
        c = matmul_kernel.matmul(a, b)
    assert c is not None and c.shape == torch.matmul(a, b).shape and c.is_contiguous()
    assert within_rounding(c, a, b)


def test_kernel_declines_what_it_does_not_take():
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        for x, y in ((a.double(), b.double()), (a[:1], b), (a[0, 0], b[0, 0]), (a.flatten(0, 1)[None, None], b),
                     (a[..., :0], b[..., :0, :])):
            assert matmul_kernel.matmul(x, y) is None
    assert matmul_kernel.matmul(a, b) is None  # autograd on


def test_matmul_module_runs_the_kernel_on_cpu_and_torch_matmul_elsewhere(monkeypatch):
    a, b = cases()["mix"]
    calls, kernel = [], matmul_kernel.matmul
    monkeypatch.setattr(matmul_kernel, "matmul", lambda x, y: calls.append(1) or kernel(x, y))
    with torch.no_grad():
        assert within_rounding(MatMul()(a, b), a, b) and len(calls) == 1
        assert torch.equal(MatMul()(a[:1].double(), b.double()), torch.matmul(a[:1].double(), b.double()))


def test_a_build_without_avx512_declines_and_writes_nothing(tmp_path, monkeypatch):
    """The portable build (no -march): 0, the output untouched, so MatMul runs torch.matmul."""
    monkeypatch.setenv("HMTCONV_CACHE", str(tmp_path))
    flags, cpu = native.candidate_flags()[-1]
    lib = ctypes.CDLL(str(native.build(matmul_kernel.SOURCE, shutil.which("cc") or shutil.which("gcc"), flags, cpu)))
    a, b, c = torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.full((2, 3, 5), 7.0)
    strides = [matmul_kernel._strides(t) for t in (a, b)]
    assert lib.hmt_matmul(ctypes.c_void_p(a.data_ptr()), ctypes.c_void_p(b.data_ptr()), ctypes.c_void_p(c.data_ptr()),
                          ctypes.c_int64(1), ctypes.c_int64(2), ctypes.c_int64(3), ctypes.c_int64(4), ctypes.c_int64(5),
                          *strides, ctypes.c_int(1)) == 0
    assert (c == 7.0).all()
