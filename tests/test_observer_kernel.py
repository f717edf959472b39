"""The observers' compiled CPU kernel against their tensor path: equal histograms and maxima,
moments equal to float64 rounding, the same errors, and the tensor path where it does not apply."""
from __future__ import annotations

import shutil

import pytest
import torch

from hmtconv.conversion import ActivationObserver
from hmtconv.conversion.observers import HistogramConfig
from hmtconv.conversion import observer_kernel

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the observers run on the tensor path")

SHAPES = [(5, 3, 7, 9), (4, 6, 10), (8, 12), (6, 5, 1, 1), (3, 70, 2, 2), (2, 3, 33, 1), (3, 20, 17)]


def hard_batch(shape, seed):
    """Normal values over 24 octaves with zeros, -0.0, values at bin edges, below the first edge
    (subnormals included) and past the last."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 12, shape, generator=g).float())
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[3::11] = -0.0
    flat[5::13] = torch.exp2(torch.randint(-16, 16, flat[5::13].shape, generator=g).float() / 32)
    flat[1] = 1e-40
    flat[2] = -(2.0**20)
    return x


def observe(batches, signed, hist, kernel, monkeypatch):
    monkeypatch.setenv("HMTCONV_CPU_KERNEL", "1" if kernel else "0")
    assert not kernel or observer_kernel.library() is not None, "observer_kernel.c did not build"
    obs = ActivationObserver(signed, hist)
    for x in batches:
        obs(x.clone())
    return obs


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_tensor_path(shape, signed, per_channel, monkeypatch):
    batches = [hard_batch(shape, seed) for seed in range(3)]
    hist = HistogramConfig(per_channel=per_channel)
    fast, ref = (observe(batches, signed, hist, kernel, monkeypatch) for kernel in (True, False))
    for name, value in ref.state_dict().items():
        if name.endswith(("mean", "m2")):  # float64 sums in another order
            assert torch.allclose(fast.state_dict()[name], value, rtol=1e-12, atol=0), name
        else:  # counts, maxima and every histogram bin: exactly
            assert torch.equal(fast.state_dict()[name], value), name


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_writes_the_clamped_output_the_histograms_take(shape, signed):
    """max(|x|, floor) (signed) or max(x, floor), bit for bit torch's abs and clamp_min, contiguous,
    also for a transposed view (attention's heads)."""
    obs = ActivationObserver(signed)
    for x in (hard_batch(shape, 7), hard_batch(shape, 8).transpose(0, 1).contiguous().transpose(0, 1)):
        dim = x.dim() - 1 if x.dim() == 3 else 1
        layer = [torch.zeros((), dtype=torch.float64) for _ in range(4)]
        channel = [torch.zeros(x.shape[dim], dtype=torch.float64) for _ in range(4)]
        merged, clamped = observer_kernel.observe_batch(x, dim, signed, layer, channel, obs.floor)
        expected = (x.abs() if signed else x).clamp_min(obs.floor)
        assert merged and clamped.is_contiguous() and torch.equal(clamped, expected)
        assert torch.equal(clamped.view(torch.int32), expected.contiguous().view(torch.int32))  # -0.0 too


def test_kernel_moments_against_float64_brute_force(monkeypatch):
    """Channels whose mean is 1e4 times their spread, in three batches: the shifted sums and
    Chan's merge keep the variance."""
    g = torch.Generator().manual_seed(0)
    batches = [(1e4 + torch.randn(16, 4, 9, 9, generator=g, dtype=torch.float64)).float() for _ in range(3)]
    obs = observe(batches, False, HistogramConfig(), True, monkeypatch)
    exact = torch.cat(batches).double().transpose(0, 1).reshape(4, -1)
    mean, sigma = obs.moments(per_channel=True)
    assert torch.allclose(mean, exact.mean(1), rtol=1e-14)
    assert torch.allclose(sigma, exact.std(1, unbiased=False), rtol=1e-9)
    assert torch.equal(obs.maximum(per_channel=True), exact.amax(1))
    mean, sigma = obs.moments(per_channel=False)
    assert torch.allclose(mean, exact.mean(), rtol=1e-14)
    assert torch.allclose(sigma, exact.std(unbiased=False), rtol=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_are_an_error_on_both_paths(bad, monkeypatch):
    for kernel in ("1", "0"):
        monkeypatch.setenv("HMTCONV_CPU_KERNEL", kernel)
        x = torch.randn(4, 3, 5, 5)
        x[2, 1, 3, 3] = bad
        with pytest.raises(ValueError, match="NaN or inf in the activations entering a site"):
            ActivationObserver(signed=False)(x)


def test_kernel_declines_what_it_cannot_run(monkeypatch):
    x = torch.randn(4, 3, 5)
    obs = ActivationObserver(signed=False)
    obs(x)  # sizes the per-channel buffers
    layer, channel = [obs.count, obs.mean, obs.m2, obs.max], [obs.ch_count, obs.ch_mean, obs.ch_m2, obs.ch_max]
    before = [t.clone() for t in layer + channel]
    assert observer_kernel.observe_batch(x.double(), 2, False, layer, channel, obs.floor) is None
    hist = torch.zeros(10, dtype=torch.int64)
    assert not observer_kernel.add_histograms(x.double(), 2, -16, 32, None, hist)
    # float32 buffers (prepared.float() casts them): writing doubles there would corrupt memory
    assert observer_kernel.observe_batch(x, 2, False, [t.float() for t in layer], channel, obs.floor) is None
    monkeypatch.setenv("HMTCONV_CPU_KERNEL", "0")
    assert observer_kernel.observe_batch(x, 2, False, layer, channel, obs.floor) is None
    assert not observer_kernel.add_histograms(x, 2, -16, 32, None, hist) and not hist.any()
    assert all(torch.equal(a, b) for a, b in zip(before, layer + channel))


def test_an_observer_cast_to_float32_still_gathers_correctly():
    obs = ActivationObserver(signed=False).float()
    x = 3 + torch.randn(64, 5)
    obs(x)
    mean, sigma = obs.moments(per_channel=True)
    assert torch.allclose(mean.double(), x.double().mean(0), rtol=1e-6)
    assert torch.allclose(sigma.double(), x.double().std(0, unbiased=False), rtol=1e-5)


def test_float64_activations_keep_the_tensor_path(monkeypatch):
    """Bit for bit what the tensor path gives (the kernel reads float32 only)."""
    batches = [hard_batch((4, 3, 5, 5), seed).double() for seed in range(2)]
    on, off = (observe(batches, True, HistogramConfig(), kernel, monkeypatch) for kernel in (True, False))
    for name, value in off.state_dict().items():
        assert torch.equal(on.state_dict()[name], value), name
