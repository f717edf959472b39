"""The compiled kernel of expectation compensation: the running mean and the step difference equal
to the tensor path bit for bit (and to their sequential float32 definitions), in place or not,
on time-major permuted views, with the tensor path kept where it does not apply."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from hmtconv import native
from hmtconv.conversion import compensation_kernel
from hmtconv.conversion.compensated import running_mean, step_difference

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: compensation runs on the tensor path")


def train(steps, shape, seed):
    """``[T*B, ...]`` float32 with wide magnitudes, ties, infinities and a NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * shape[0], *shape[1:], generator=g) * torch.exp2(
        torch.randint(-10, 10, (steps * shape[0], *shape[1:]), generator=g).float())
    flat = x.view(-1)
    flat[::9] = 0.5
    if flat.numel() > 20:
        flat[3], flat[7], flat[11] = float("inf"), -float("inf"), float("nan")
    return x


def both(fn, x, steps, monkeypatch, **kw):
    """(kernel result, tensor-path result), each from its own copy of ``x``; the kernel must have
    built (else both would be the tensor path's)."""
    assert compensation_kernel.library() is not None, "compensation_kernel.c did not build"
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("HMTCONV_CPU_KERNEL", flag)
        results.append(fn(x.clone(), steps, **kw))
    return results


def equal(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def sequential_running_mean(x, steps):
    x = x.reshape(steps, -1).numpy()
    s, out = x[0].copy(), [x[0].copy()]
    for t in range(1, steps):
        s = (s + x[t]).astype(np.float32)
        out.append((s / np.float32(t + 1)).astype(np.float32))
    return torch.from_numpy(np.stack(out).reshape(-1))


def sequential_difference(y, steps):
    y = y.reshape(steps, -1).numpy()
    out = [y[0].copy()]
    for t in range(1, steps):
        out.append(((y[t] * np.float32(t + 1)).astype(np.float32) - (y[t - 1] * np.float32(t)).astype(np.float32)))
    return torch.from_numpy(np.stack(out).reshape(-1))


@pytest.mark.parametrize("steps", [1, 2, 5, 16])
@pytest.mark.parametrize("shape", [(3, 7), (2, 4, 5, 6), (1, 1100)])
@pytest.mark.parametrize("inplace", [False, True])
def test_running_mean_kernel_equals_tensor_path_and_definition(steps, shape, inplace, monkeypatch):
    x = train(steps, shape, steps)
    kernel, tensor = both(running_mean, x, steps, monkeypatch, inplace=inplace)
    assert equal(kernel, tensor)
    with np.errstate(invalid="ignore", over="ignore"):
        assert equal(kernel.reshape(-1), sequential_running_mean(x, steps))


@pytest.mark.parametrize("steps", [1, 2, 5, 16])
@pytest.mark.parametrize("shape", [(3, 7), (2, 4, 5, 6), (1, 1100)])
def test_step_difference_kernel_equals_tensor_path_and_definition(steps, shape, monkeypatch):
    y = train(steps, shape, steps + 1)
    kernel, tensor = both(step_difference, y, steps, monkeypatch)
    assert equal(kernel, tensor)
    with np.errstate(invalid="ignore", over="ignore"):
        assert equal(kernel.reshape(-1), sequential_difference(y, steps))


def test_permuted_views_run_in_memory_order_and_others_fall_back(monkeypatch):
    """Attention's transposed heads keep time outermost: the kernel takes them as they lie;
    a sliced view does not fill its memory: the tensor path (same values either way)."""
    steps, base = 4, train(4, (2, 3, 5, 6), 0)
    heads = base.transpose(-3, -2)  # [T*B, 5, 3, 6] view of a contiguous tensor
    assert native.memory_order(heads, 1) is not None and not heads.is_contiguous()
    sliced = base[..., ::2]
    assert native.memory_order(sliced, 1) is None
    for view in (heads, sliced):
        kernel, tensor = both(running_mean, view, steps, monkeypatch)
        assert equal(kernel, tensor) and kernel.shape == view.shape
        kernel, tensor = both(step_difference, view, steps, monkeypatch)
        assert equal(kernel, tensor)
    assert not compensation_kernel.running_mean(sliced, torch.empty_like(sliced), steps)


def test_the_kernel_declines_float64_and_when_switched_off(monkeypatch):
    x = torch.randn(8, 3)
    assert not compensation_kernel.running_mean(x.double(), x.double(), 2)
    assert not compensation_kernel.running_mean(x, x.clone(), 3)  # 8 rows are not 3 steps of a batch
    assert compensation_kernel.step_difference(x, x.clone(), 2)
    monkeypatch.setenv("HMTCONV_CPU_KERNEL", "0")
    assert not compensation_kernel.step_difference(x, x.clone(), 2)
