"""The observers' compiled CPU kernel against their tensor path: equal histograms and maxima,
moments equal to float64 rounding, the same errors, and the tensor path where it does not apply;
the exact bin edges both use."""
from __future__ import annotations

import shutil

import pytest
import torch

from hmtconv.conversion import ActivationObserver
from hmtconv.conversion import observer_kernel
from hmtconv.conversion.histograms import HistogramConfig, ceil_to, octave_tables

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the observers run on the tensor path")

# (the last two: channels of 25,600 values, and 20,000 tokens a batch, enough to be counted in
# four interleaved parts: see add_counts)
SHAPES = [(5, 3, 7, 9), (4, 6, 10), (8, 12), (6, 5, 1, 1), (3, 70, 2, 2), (2, 3, 33, 1), (3, 20, 17), (4, 2, 80, 80),
          (20, 1000, 8)]


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


HISTOGRAMS = {"channel": HistogramConfig(), "layer": HistogramConfig(per_channel=False), "none": None}


@pytest.mark.parametrize("histograms", HISTOGRAMS)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_tensor_path(shape, signed, histograms, monkeypatch):
    batches = [hard_batch(shape, seed) for seed in range(3)]
    hist = HISTOGRAMS[histograms]
    fast, ref = (observe(batches, signed, hist, kernel, monkeypatch) for kernel in (True, False))
    # float64 sums in another order: the rounding of a sum scales with its largest terms (values
    # up to 2**20 here, whose mean may be near 0)
    top = max(float(x.abs().max()) for x in batches)
    for name, value in ref.state_dict().items():
        if name.endswith(("mean", "m2")):
            scale = top if name.endswith("mean") else top**2 * float(ref.count)
            assert torch.allclose(fast.state_dict()[name], value, rtol=1e-12, atol=1e-13 * scale), name
        else:  # counts, maxima and every histogram bin: exactly
            assert torch.equal(fast.state_dict()[name], value), name


def strided_views():
    """Activations that are views: the heads of attention (permuted slices of one projection),
    channels last, and layouts the kernel must copy first (an expanded dim, a strided slice)."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(6, 10, 3, 4, 24, generator=g)  # [B, N, q/k/v, heads, d]
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, heads, N, d], channels = heads
    conv = torch.randn(5, 6, 7, 7, generator=g)
    tokens = torch.randn(4, 9, 12, generator=g)
    small_heads = torch.randn(4, 9, 3, 6, 5, generator=g).permute(2, 0, 3, 1, 4)[0]  # runs of 5 values
    in_place = {"q": q, "k^T": k.transpose(-2, -1), "v": v, "small heads": small_heads,
                "channels last": conv.contiguous(memory_format=torch.channels_last),
                "channel major": conv.transpose(0, 1).contiguous().transpose(0, 1)}
    copied = {"expanded": conv[:, :, :1].expand(5, 6, 4, 7), "every other row": conv[:, :, ::2],
              "tokens after the first": tokens[:, 1:]}
    return in_place, copied


@pytest.mark.parametrize("signed", [False, True])
def test_views_are_read_in_place_and_equal_their_contiguous_copy(signed, monkeypatch):
    in_place, copied = strided_views()
    for name, x in {**in_place, **copied}.items():
        dim = 2 if x.dim() == 3 else 1
        assert (observer_kernel._layout(x, dim) is None) == (name in copied), name
        ref = observe([x.contiguous()], signed, HistogramConfig(), False, monkeypatch)
        monkeypatch.setenv("HMTCONV_CPU_KERNEL", "1")
        fast = ActivationObserver(signed)
        fast(x)  # as it is (observe() clones, which closes the gaps between heads)
        for key, value in ref.state_dict().items():
            if key.endswith(("mean", "m2")):
                assert torch.allclose(fast.state_dict()[key], value, rtol=1e-12, atol=0), (name, key)
            else:
                assert torch.equal(fast.state_dict()[key], value), (name, key)


@pytest.mark.parametrize("signed", [False, True])
def test_values_at_and_just_below_every_edge_take_their_bins(signed, monkeypatch):
    """Every edge's smallest float32 at or above it, and the float32 just below that, on both paths
    and against a float64 search of the edges 2**(min_exp + k/32): the bins come from exact edges,
    not from a log2 whose rounding could put such values in either bin."""
    cfg = HistogramConfig()
    exact = torch.exp2(cfg.min_exp + torch.arange(cfg.bins - 1, dtype=torch.float64) / cfg.bins_per_octave)
    at = ceil_to(exact, torch.float32)
    below = torch.nextafter(at, torch.zeros_like(at))
    values = torch.cat((at, below, at * 2**-30, at * 2**30))  # and far below the first edge, past the last
    x = (-values if signed else values).view(-1, 1)  # a signed site bins |x|
    expected = torch.searchsorted(exact, values.double(), right=True)
    assert torch.equal(expected[:cfg.bins - 1], torch.arange(1, cfg.bins))  # each edge opens its bin
    assert torch.equal(expected[cfg.bins - 1:2 * cfg.bins - 2], torch.arange(cfg.bins - 1))  # ... and closes the last
    for kernel in (True, False):
        obs = observe([x], signed, cfg, kernel, monkeypatch)
        assert torch.equal(obs.hist_channel[0], torch.bincount(expected, minlength=cfg.bins)), kernel


@pytest.mark.parametrize("bins_per_octave", [3, 32, 1024])
def test_kernel_bins_every_float32_of_two_octaves_exactly(bins_per_octave, monkeypatch):
    """All 2**23 mantissas of the octave [1, 2) and of the one just below the first edge: the
    kernel's fast place in the octave (a polynomial log2, exact lookups near edges) against the
    edge table's own counts, for coarse, default and the finest allowed bins."""
    cfg = HistogramConfig(bins_per_octave=bins_per_octave)
    edge, _ = octave_tables(bins_per_octave)
    mantissas = torch.arange(1 << 23, dtype=torch.int32)
    one = (mantissas | 0x3F800000).view(torch.float32)
    below = one * 2.0 ** (cfg.min_exp - 1)  # [2**(min_exp - 1), 2**min_exp): bin 0
    for x, first in ((one, -cfg.min_exp * bins_per_octave + 1), (below, 0)):
        obs = observe([x.view(1, 1, 2048, 4096)], False, cfg, True, monkeypatch)
        expected = torch.zeros(cfg.bins, dtype=torch.int64)
        if first:
            expected[first:first + bins_per_octave] = (edge[1:] - edge[:-1]).long()
        else:
            expected[0] = 1 << 23
        assert torch.equal(obs.histogram(per_channel=False)[0][0], expected)


@pytest.mark.parametrize("bins_per_octave", [1, 3, 32, 100, 1024])
def test_octave_tables_against_a_search_of_every_mantissa_prefix(bins_per_octave):
    """The kernel's lookup (lut, then one comparison) equals a search of the edges for mantissas at,
    just below and just above every edge and at every 1/4096 of the octave."""
    edge, lut = octave_tables(bins_per_octave)
    m = torch.cat((edge[:-1], edge[1:-1] - 1, edge[:-1] + 1, torch.arange(4096, dtype=torch.int32) << 11,
                   torch.tensor([(1 << 23) - 1], dtype=torch.int32)))
    j = lut[m >> 11].long()
    j += (m >= edge[j + 1]).long()
    assert torch.equal(j, torch.searchsorted(edge[1:-1], m, right=True))
    assert torch.equal(edge[:-1], edge[:-1].sort().values) and int(edge[0]) == 0


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


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:3] + [(3, 20, 17)])
def test_without_histograms_the_kernel_gathers_the_same_moments_bit_for_bit(shape, signed, monkeypatch):
    """Skipping the bins and counts (histogram=None) leaves the moments' arithmetic as it was:
    thresholds from moments are the same whether or not histograms were gathered."""
    batches = [hard_batch(shape, seed) for seed in range(3)]
    full, bare = (observe(batches, signed, hist, True, monkeypatch) for hist in (HistogramConfig(), None))
    for name, value in bare.state_dict().items():
        if not name.startswith("hist"):
            assert torch.equal(full.state_dict()[name], value), name
    assert bare.hist_channel.numel() == bare.hist_layer.numel() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("hist", [HistogramConfig(), None], ids=["histograms", "none"])
def test_non_finite_activations_are_an_error_on_both_paths_and_count_nothing(bad, hist, monkeypatch):
    """The kernel counts as it goes: a bad batch is counted back out, so the observer keeps the
    statistics of the batches before it."""
    for kernel in ("1", "0"):
        monkeypatch.setenv("HMTCONV_CPU_KERNEL", kernel)
        for shape in ((4, 3, 5, 5), (4, 6, 20), (4, 2, 80, 80), (20, 1000, 8)):  # (the last two: in parts)
            obs = ActivationObserver(signed=False, hist=hist)
            obs(torch.randn(shape))
            before = {k: v.clone() for k, v in obs.state_dict().items()}
            x = torch.randn(shape)
            x.view(-1)[x.numel() // 2 + 3] = bad
            with pytest.raises(ValueError, match="NaN or inf in the activations entering a site"):
                obs(x)
            assert all(torch.equal(v, obs.state_dict()[k]) for k, v in before.items()), (kernel, shape)


def test_kernel_declines_what_it_cannot_run(monkeypatch):
    x = torch.randn(4, 3, 5)
    obs = ActivationObserver(signed=False)
    obs(x)  # sizes the per-channel buffers
    layer, channel = [obs.count, obs.mean, obs.m2, obs.max], [obs.ch_count, obs.ch_mean, obs.ch_m2, obs.ch_max]
    before = [t.clone() for t in layer + channel + [obs.hist_channel]]

    def run(x, layer=layer, counts=obs.hist_channel):
        return observer_kernel.observe_batch(x, 2, False, obs.hist, layer, channel, counts)
    assert run(x.double()) is None
    # buffers cast by prepared.float(): writing doubles or int64 there would corrupt memory
    assert run(x, layer=[t.float() for t in layer]) is None
    assert run(x, counts=obs.hist_channel.float()) is None
    with pytest.raises(ValueError, match="the kernel would count past their end"):
        run(x, counts=torch.zeros(2, obs.hist.bins, dtype=torch.int64))  # 2 channels' rows for 5 channels' values
    monkeypatch.setenv("HMTCONV_CPU_KERNEL", "0")
    assert run(x) is None
    assert all(torch.equal(a, b) for a, b in zip(before, layer + channel + [obs.hist_channel]))


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
