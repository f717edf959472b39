"""The compiled CPU neuron kernel: equal to the tensor path bit for bit, exact by Fractions, and
falling back cleanly where it does not apply."""
from __future__ import annotations

import shutil
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from hmtconv import native
from hmtconv.neurons import HMTNeuron, MTNeuron, MultiLevelNeuron, cpu_kernel

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler: the neurons run on the tensor path")


# Layouts of a [T, B, tokens, heads, d]-like tensor the kernel meets: as it is, attention's heads
# transposed (run in memory order), sliced (through a contiguous copy)
LAYOUTS = {"contiguous": lambda t: t, "heads transposed": lambda t: t.transpose(-2, -3), "sliced": lambda t: t[..., ::2]}


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch):
    monkeypatch.setenv("HMTCONV_CPU_KERNEL", "1")


def both_paths(neuron, x):
    """(out, spikes, synops) from the kernel (asserted to have run) and from the tensor path."""
    lam = neuron.lam.to(x.dtype)
    results = []
    for use_kernel in (True, False):
        out = torch.empty_like(x)
        spikes = torch.zeros(x.shape[0], dtype=torch.float64)
        synops = torch.zeros_like(spikes) if neuron.fanout is not None else None
        if use_kernel:
            assert cpu_kernel.run(x, out, lam, neuron.fanout, neuron.spike_lut, neuron.levels, neuron.mode,
                                  spikes, synops)
        else:
            neuron._forward_tensors(x, out, lam, spikes, synops)
        results.append((out, spikes, synops))
    return results


def with_ties(shape, lam, levels, g):
    """Inputs whose first-step membrane lam/2 + x lands on rounded multiples j*lam and one ulp off."""
    x = torch.randn(shape, generator=g) * lam * levels / 2
    j = torch.randint(0, levels + 2, shape[1:], generator=g).to(torch.float32)
    target = j * lam - lam / 2
    x[0] = torch.where(torch.rand(shape[1:], generator=g) < 0.5, target, torch.nextafter(target, x[0]))
    return x


@needs_compiler
@pytest.mark.parametrize("kind,n", [("hmt", 1), ("hmt", 4), ("hmt", 8), ("hmt", 16), ("mt", 3)])
@pytest.mark.parametrize("mode", ["unsigned", "signed", "communicate"])
@pytest.mark.parametrize("shape,per_channel", [((5, 3, 6, 6), True), ((4, 9, 24), True), ((3, 700), False),
                                               ((1, 2, 3), False), ((11,), False)])
def test_kernel_equals_tensor_path(kind, n, mode, shape, per_channel):
    """Outputs, spikes per step and fan-out-weighted spikes per step, bit for bit, over 7 steps
    with ties; per-channel thresholds along dim 1 (conv) or the last dim (tokens), one block of
    positions and several (700 > 512), a 1-D shape without a batch dim."""
    g = torch.Generator().manual_seed(n)
    channels = shape[1] if len(shape) == 4 else shape[-1]
    lam = (torch.rand(channels, generator=g) * 0.5 + 0.05) if per_channel else torch.tensor(0.37)
    if per_channel and len(shape) == 4:
        lam = lam.view(-1, 1, 1)
    signed, communicate = mode != "unsigned", mode == "communicate"
    neuron = (HMTNeuron(n, lam, signed=signed, communicate=communicate) if kind == "hmt"
              else MTNeuron(n, lam * n, signed=signed))
    neuron.fanout = torch.randint(0, 9, shape[1:] if len(shape) > 1 else shape, generator=g).to(torch.float32)
    x = with_ties((7, *shape), 0.37 if not per_channel else lam.flatten()[0].item(), neuron.levels, g)
    (out, spikes, synops), (ref_out, ref_spikes, ref_synops) = both_paths(neuron, x)
    assert torch.equal(out, ref_out) and torch.equal(spikes, ref_spikes) and torch.equal(synops, ref_synops)
    assert spikes.sum() > 0


@pytest.fixture(params=["portable", "avx2"])
def other_build(request, monkeypatch, tmp_path):
    """The kernel built for another CPU, in a cache of its own (the usual build again afterwards):
    "portable" without -march=native (a CPU without AVX2 and FMA: the plain C loops instead of the
    16- and 8-lane ones), "avx2" without AVX-512 (the 8-lane loops throughout)."""
    if request.param == "portable":
        flags = [entry for entry in native.candidate_flags() if "-march=native" not in entry[0]]
    else:
        flags = [([*f, "-mno-avx512f"], key + b" no avx512") for f, key in native.candidate_flags()
                 if "-march=native" in f]
        if not flags or b"avx2" not in flags[0][1]:
            pytest.skip("this CPU has no AVX2")
    monkeypatch.setattr(native, "candidate_flags", lambda: flags)
    monkeypatch.setenv("HMTCONV_CACHE", str(tmp_path))
    for cached in (native.load, cpu_kernel.library):
        cached.cache_clear()
    yield
    for cached in (native.load, cpu_kernel.library):
        cached.cache_clear()


@needs_compiler
@pytest.mark.parametrize("mode", ["unsigned", "signed", "communicate"])
def test_other_builds_equal_tensor_path(other_build, mode):
    g = torch.Generator().manual_seed(5)
    lam = torch.rand(24, generator=g) * 0.5 + 0.05
    neuron = HMTNeuron(4, lam, signed=mode != "unsigned", communicate=mode == "communicate")
    neuron.fanout = torch.randint(0, 9, (9, 24), generator=g).to(torch.float32)
    x = with_ties((7, 4, 9, 24), lam[0].item(), neuron.levels, g)
    (out, spikes, synops), (ref_out, ref_spikes, ref_synops) = both_paths(neuron, x)
    assert cpu_kernel.library() is not None
    assert torch.equal(out, ref_out) and torch.equal(spikes, ref_spikes) and torch.equal(synops, ref_synops)


def nibble_table(levels: int) -> torch.Tensor:
    """A spike table that splits as lo[k % 16] + hi[k // 16] (as H-MT's popcount does), not popcount."""
    k = torch.arange(levels + 1)
    return (k % 16 % 5 + 3 * (k // 16)).to(torch.float32)


@needs_compiler
@pytest.mark.parametrize("levels,lut", [
    (200, nibble_table(200)),  # the kernel's byte-shuffle count; next, a table that does not split
    (40, torch.cat([torch.zeros(1), torch.randint(0, 21, (40,), generator=torch.Generator().manual_seed(3))])),
    (12, torch.arange(13, dtype=torch.float32) * 90),  # entries above a byte
    (255, torch.cat([torch.zeros(1), torch.full((255,), 255.0)])),  # the largest byte, up to the last level
])
@pytest.mark.parametrize("mode", ["unsigned", "signed", "communicate"])
def test_kernel_counts_any_spike_table_with_large_fanouts(levels, lut, mode):
    """The count of binary spikes, plain and weighted by fan-outs up to 2**30 (64-bit products),
    equals the tensor path's for spike tables that split into nibble tables and ones that do not."""
    g = torch.Generator().manual_seed(levels)
    neuron = MultiLevelNeuron(0.25, signed=mode != "unsigned", communicate=mode == "communicate",
                              levels=levels, spike_lut=lut)
    neuron.fanout = (torch.randint(0, 2**23, (3, 37), generator=g) * 128).to(torch.float32)  # 37: not 8 | n
    x = torch.randn(5, 2, 3, 37, generator=g) * 0.25 * levels / 2
    (out, spikes, synops), (ref_out, ref_spikes, ref_synops) = both_paths(neuron, x)
    assert torch.equal(out, ref_out) and torch.equal(spikes, ref_spikes) and torch.equal(synops, ref_synops)
    assert synops.max() > 2.0**31 and spikes.sum() > 0


@needs_compiler
def test_kernel_level_is_the_exact_floor_by_fractions():
    """One step from v = lam/2, against exact rational arithmetic on the membrane the kernel sees;
    the data hits both ways a rounded quotient fails (m / lam and m * (1 / lam))."""
    g = torch.Generator().manual_seed(0)
    lams = torch.cat([torch.tensor([0.1, 0.3, 1 / 3, 0.7, 1e-3, 123.456]), torch.rand(10, generator=g) * 5 + 1e-4])
    levels = 15
    multiples = torch.arange(0, levels + 2, dtype=torch.float32).unsqueeze(1) * lams
    members = [multiples, torch.nextafter(multiples, torch.zeros_like(multiples)),
               torch.nextafter(multiples, multiples * 2 + 1), torch.randn(100, len(lams), generator=g) * 10 * lams]
    wrong_div = wrong_mul = 0
    for m_target in members:
        for j, lam in enumerate(lams.tolist()):
            neuron = HMTNeuron(4, lam)
            lam32 = neuron.lam.to(torch.float32)
            x = m_target[:, j] - lam32 / 2
            m = lam32 / 2 + x  # the membrane of step 1, as the kernel computes it
            out = neuron(x.unsqueeze(0))[0]
            exact = torch.tensor([min(max(Fraction(v) // Fraction(lam32.item()), 0), levels) for v in m.tolist()])
            assert torch.equal(out, exact.to(torch.float32) * lam32)
            wrong_div += (torch.div(m, lam32).floor().clamp(0, levels) != exact).sum().item()
            wrong_mul += ((m * (1 / lam32)).floor().clamp(0, levels) != exact).sum().item()
    assert wrong_div > 0 and wrong_mul > 0


@needs_compiler
@pytest.mark.parametrize("view", ["transposed", "sliced"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_kernel_on_strided_views_written_in_place_and_infinities(view, per_channel):
    """Attention's head views are permutations of a contiguous tensor (run in memory order, with
    per-channel thresholds and fan-outs permuted alike); other strided inputs are copied. The sites
    pass ``out=x``. Infinities saturate."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 4, 10, 3, 8, generator=g)
    base[2, 0, 0, 0, 0], base[3, 1, 2, 1, 1] = float("inf"), float("-inf")
    def strided_view(t):
        return t.transpose(-2, -3) if view == "transposed" else t[..., ::2]
    strided = strided_view(base)
    lam = torch.rand(strided.shape[-1], generator=g) + 0.1 if per_channel else torch.tensor(0.2)
    neuron = HMTNeuron(4, lam, signed=True)
    neuron.fanout = torch.randint(0, 5, strided.shape[2:], generator=g).to(torch.float32)
    ref = both_paths(neuron, strided.contiguous())[1]
    x = strided_view(base.clone())
    assert not x.is_contiguous()
    out = neuron(x, out=x)
    assert out is x and torch.equal(out, ref[0]) and torch.equal(neuron.spikes, ref[1])
    assert torch.equal(neuron.synops, ref[2])


def test_kernel_declines_what_it_cannot_run_equal(monkeypatch):
    """float64, thresholds or fan-outs that vary along the batch dim, thresholds whose reciprocal
    is not a normal float, fractional fan-outs, or switched off."""
    def runs(x, lam, fanout=None):
        spikes = torch.zeros(x.shape[0], dtype=torch.float64)
        return cpu_kernel.run(x, torch.empty_like(x), lam, fanout, torch.tensor([0.0, 1.0]), 1, "unsigned",
                              spikes, torch.zeros_like(spikes))
    x = torch.randn(3, 4, 5)
    assert not runs(x.double(), torch.tensor(0.5, dtype=torch.float64))
    assert not runs(x, torch.rand(4, 1) + 0.1)
    assert not runs(x, torch.tensor(1e-35)) and not runs(x, torch.tensor(1e35))
    assert not runs(x, torch.tensor(0.5), fanout=torch.full((5,), 2.5))
    assert not runs(x, torch.tensor(0.5), fanout=torch.randint(0, 3, (4, 5)).float())  # varies along the batch
    monkeypatch.setenv("HMTCONV_CPU_KERNEL", "0")
    assert not runs(x, torch.tensor(0.5))
    with pytest.raises(ValueError, match="non-negative integers"):  # so the kernel may count in int32
        MultiLevelNeuron(0.5, signed=False, communicate=False, levels=1, spike_lut=torch.tensor([0.0, 0.5]))
    for lut in ([1.0, 1.0], [0.0, 1.0, 2.0]):  # level 0 spikes; one entry too many
        with pytest.raises(ValueError, match="levels 0..1"):
            MultiLevelNeuron(0.5, signed=False, communicate=False, levels=1, spike_lut=torch.tensor(lut))


@needs_compiler
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), mode=st.sampled_from(["unsigned", "signed", "communicate"]),
       lam=st.floats(2.0**-20, 2.0**20, width=32),
       values=st.lists(st.floats(-2.0**24, 2.0**24, width=32), min_size=4, max_size=48))
def test_kernel_equals_tensor_path_on_arbitrary_floats(n, mode, lam, values):
    """Any float32 inputs and threshold: steps of 4 elements, as many as the list gives."""
    neuron = HMTNeuron(n, lam, signed=mode != "unsigned", communicate=mode == "communicate")
    x = torch.tensor(values[: len(values) // 4 * 4], dtype=torch.float32).view(-1, 2, 2)
    (out, spikes, _), (ref_out, ref_spikes, _) = both_paths(neuron, x)
    assert torch.equal(out, ref_out) and torch.equal(spikes, ref_spikes)


@needs_compiler
def test_kernel_plan_is_reused_until_thresholds_fanouts_or_layout_change():
    """A neuron keeps its kernel arguments between calls; changing lam in place (tracked or through
    ``.data``, which leaves its version counter as it was), replacing the fan-outs or feeding
    another layout gives results equal to a fresh neuron's, never stale ones."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, 6, 8, generator=g)

    def fresh(lam, fanout):
        neuron = HMTNeuron(4, lam, signed=True, communicate=True)
        neuron.fanout = fanout
        return neuron(x.clone()), neuron.spikes, neuron.synops

    neuron = HMTNeuron(4, torch.full((8,), 0.2), signed=True, communicate=True)
    neuron.fanout = torch.full((6, 8), 3.0)
    neuron(x.clone())
    first = neuron._kernel_plan
    neuron(x.clone())
    assert first is not None and neuron._kernel_plan is first
    for change in ("lam", "lam.data", "fanout", "layout"):
        if change == "lam":
            neuron.lam.mul_(1.5)
        elif change == "lam.data":
            neuron.lam.data.mul_(0.75)
        elif change == "fanout":
            neuron.fanout = torch.full((6, 8), 7.0)
        out = neuron(x.clone()) if change != "layout" else neuron(x.clone().transpose(2, 3).contiguous().transpose(2, 3))
        assert neuron._kernel_plan is not first
        first = neuron._kernel_plan
        ref = fresh(neuron.lam.clone(), neuron.fanout.clone())
        assert torch.equal(out, ref[0]) and torch.equal(neuron.spikes, ref[1]) and torch.equal(neuron.synops, ref[2])


@needs_compiler
def test_a_neuron_made_in_inference_mode_runs_in_and_out_of_it():
    """Inference tensors have no version counter (reading it is an error): convert under
    ``torch.inference_mode()`` made SNNs that could not run."""
    x = torch.randn(4, 2, 6, 8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        neuron = HMTNeuron(4, torch.full((8,), 0.2), signed=True, communicate=True)
        inside = neuron(x.clone())
        assert neuron._kernel_plan is not None
        neuron.lam.mul_(2)  # in inference mode: no version counter to see it
        doubled = neuron(x.clone())
    reference = HMTNeuron(4, torch.full((8,), 0.4), signed=True, communicate=True)
    assert torch.equal(doubled, reference(x.clone())) and not torch.equal(inside, doubled)
    assert torch.equal(neuron(x.clone()), doubled)


@needs_compiler
@pytest.mark.parametrize("mode", ["unsigned", "signed", "communicate"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_output_sum_equals_tensor_path_and_the_sequential_sum(monkeypatch, mode, layout):
    """``sum_outputs``: the outputs summed over the steps from 0 in float32, by the kernel (in
    its memory order, mapped back) and by the tensor path, bit for bit."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 3, 10, 4, 8, generator=g)
    view = LAYOUTS[layout]
    totals = []
    for kernel in ("1", "0"):
        monkeypatch.setenv("HMTCONV_CPU_KERNEL", kernel)
        neuron = HMTNeuron(4, torch.rand(view(base).shape[-1], generator=g.manual_seed(3)) + 0.1,
                           signed=mode != "unsigned", communicate=mode == "communicate")
        neuron.sum_outputs = True
        out = neuron(view(base.clone()))
        assert (neuron._kernel_plan is not None) == (kernel == "1")
        reference = torch.zeros_like(out[0])
        for step in out:
            reference += step
        assert torch.equal(neuron.output_sum, reference) and neuron.output_sum.shape == out.shape[1:]
        totals.append(neuron.output_sum)
    assert torch.equal(*totals)


@needs_compiler
@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("mode", ["unsigned", "signed", "communicate"])
def test_kernel_and_tensor_path_take_nan_and_infinities_alike(n, mode):
    """An infinite membrane saturates (ATen's floor division, the tensor path's above 16 levels,
    gives NaN for it); a NaN input gives a NaN output and no spike (its level went into the spike
    count as an int32 index out of range)."""
    x = torch.tensor([[[float("inf"), 1.0, float("nan"), float("-inf"), 0.3]]] * 3)  # [T = 3, B = 1, 5]
    neuron = HMTNeuron(n, 0.25, signed=mode != "unsigned", communicate=mode == "communicate")
    neuron.fanout = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (kernel, tensors) = both_paths(neuron, x)
    for a, b in zip(kernel, tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert kernel[0][:, 0, 0].tolist() == [0.25 * (2**n - 1)] * 3
