import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hmtconv import HMTNeuron, MTNeuron
from reference import basal_fire, hmt_literal, hmt_literal_membranes


def _inputs(T, shape, lam, n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lam = torch.as_tensor(lam, dtype=dtype)
    top = lam * (2**n - 1)
    x = (torch.rand((T, *shape), generator=g, dtype=dtype) * 2.6 - 1.3) * top  # negative and saturating
    # exact threshold crossings: v[0] + x = level * lam exactly at the first step
    levels = torch.randint(0, 2**n, (T, *shape), generator=g).to(dtype)
    on_grid = torch.rand((T, *shape), generator=g) < 0.2
    x = torch.where(on_grid, levels * lam - lam / 2, x)
    return x


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("signed,communicate", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_closed_form_equals_literal_greedy(n, signed, communicate, per_channel):
    g = torch.Generator().manual_seed(n)
    lam = (torch.rand(3, 1, 1, generator=g) + 0.05) if per_channel else torch.tensor(0.37)
    x = _inputs(6, (2, 3, 4, 5), lam, n, seed=n)
    neuron = HMTNeuron(n, lam, signed=signed, communicate=communicate)
    out = neuron(x)
    ref, ref_spikes = hmt_literal(x, lam, n, signed, communicate)
    assert torch.equal(out, ref)
    assert torch.equal(neuron.spikes, ref_spikes)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 10), T=st.integers(1, 8), signed=st.booleans(), communicate=st.booleans(),
       lam=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16), double=st.booleans())
def test_property_equals_literal(n, T, signed, communicate, lam, seed, double):
    dtype = torch.float64 if double else torch.float32
    x = _inputs(T, (37,), lam, n, seed, dtype)
    neuron = HMTNeuron(n, lam, signed=signed, communicate=communicate)
    out = neuron(x)
    ref, ref_spikes = hmt_literal(x, torch.tensor(lam, dtype=dtype), n, signed, communicate)
    assert torch.equal(out, ref)
    assert torch.equal(neuron.spikes, ref_spikes)


def test_values_just_below_threshold_do_not_fire():
    # m = nextafter(k*lam, 0): float32 division rounds m/lam up to k; the greedy rule does not fire.
    lam = torch.tensor(0.1)
    k = torch.arange(1, 16, dtype=torch.float32)
    below = torch.nextafter(k * lam, torch.zeros(()))
    x = (below - lam / 2).unsqueeze(0)
    out = HMTNeuron(4, lam)(x)
    ref, _ = hmt_literal(x, lam, 4)
    assert torch.equal(out, ref)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), T=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_lemma_4_1_membranes_sum_to_lam_and_one_side_fires(n, T, seed):
    lam = 0.25  # a power of two: eq. 22 then holds exactly in floating point
    x = _inputs(T, (50,), lam, n, seed, torch.float64)
    for v_pos, v_neg, s_pos, s_neg in hmt_literal_membranes(x, lam, n):
        assert torch.allclose(v_pos + v_neg, torch.full_like(v_pos, lam), atol=1e-12)
        assert not ((s_pos > 0) & (s_neg > 0)).any()


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("n,T", [(1, 8), (2, 5), (4, 16), (8, 3)])
def test_eq20_average_output_under_constant_input(n, T, signed):
    lam = 0.3
    top = (2**n - 1) * lam
    z = torch.linspace(-1.5 * top if signed else -0.5 * top, 1.5 * top, 4001, dtype=torch.float64)
    x = z.expand(T, -1)
    avg = HMTNeuron(n, lam, signed=signed)(x).mean(0)
    low = -(2**n - 1) * T if signed else 0
    ratio = (z * T + lam / 2) / lam
    expected = lam / T * torch.clamp(torch.floor(ratio), low, (2**n - 1) * T)
    # inputs within rounding of a level boundary may land on either side in floating point
    clear = (ratio - torch.round(ratio)).abs() > 1e-9
    assert clear.float().mean() > 0.9
    assert torch.allclose(avg[clear], expected[clear], atol=1e-12)


def test_if_neuron_is_n_equal_1():
    theta = 1.0
    x = torch.tensor([[0.6], [0.6], [0.6], [0.6]])
    out = HMTNeuron(1, theta)(x)
    # v0 = 0.5: 1.1 -> fire (0.1), 0.7, 1.3 -> fire (0.3), 0.9
    assert out.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]


def test_spikes_are_popcounts():
    lam = 1.0
    x = torch.tensor([[6.5, 0.0, 14.5, 1.5]])  # m = 7, 0.5, 15, 2 -> levels 7, 0, 15, 2
    neuron = HMTNeuron(4, lam)
    neuron(x)
    assert neuron.spikes.tolist() == [3 + 0 + 4 + 1]


def test_synops_weight_spikes_by_fanout():
    neuron = HMTNeuron(3, 1.0)
    neuron.fanout = torch.tensor([2.0, 10.0])
    neuron(torch.tensor([[[2.5, 0.5]], [[0.0, 6.5]]]))  # [T=2, B=1, 2]
    # step 1: m = (3.0, 1.0) -> levels (3, 1) -> spikes (2, 1), v = 0; step 2: m = (0, 6.5) -> level 6 -> 2
    assert neuron.spikes.tolist() == [3.0, 2.0]
    assert neuron.synops.tolist() == [2 * 2 + 1 * 10, 2 * 10]


def test_no_state_leaks_between_calls():
    neuron = HMTNeuron(4, 0.5, signed=True)
    x = torch.randn(5, 10)
    first = neuron(x)
    neuron(torch.randn(5, 10) * 100)
    assert torch.equal(neuron(x), first)


def test_lam_is_a_buffer_in_state_dict():
    neuron = HMTNeuron(4, torch.full((3, 1, 1), 0.2))
    assert "lam" in neuron.state_dict()
    clone = HMTNeuron(4, 1.0)
    clone.lam = torch.empty(3, 1, 1)
    clone.load_state_dict(neuron.state_dict())
    assert torch.equal(clone.lam, neuron.lam)


def test_thresholds_of_another_n_are_refused_by_load_state_dict(tmp_path):
    """lam is the step of a neuron with 2**n - 1 levels: the state_dict's metadata says how many,
    through torch.save too; a dict without metadata (or of a neuron with as many levels) loads."""
    saved = HMTNeuron(4, 0.1).state_dict()
    torch.save(saved, tmp_path / "neuron.pt")
    for state in (saved, torch.load(tmp_path / "neuron.pt")):
        other = HMTNeuron(8, 0.2)
        with pytest.raises(RuntimeError, match=r"lam: thresholds of a neuron with 15 levels .* one with 255"):
            other.load_state_dict(state)
        assert other.lam.item() == pytest.approx(0.2)
    with pytest.raises(RuntimeError, match=r"a neuron with 1 level cannot load into one with 15 levels"):
        HMTNeuron(4, 0.1).load_state_dict(HMTNeuron(1, 0.1).state_dict())
    for same, state in ((HMTNeuron(4, 0.3), saved), (MTNeuron(15, 0.3), saved), (HMTNeuron(8, 0.3), dict(saved))):
        same.load_state_dict(state)
        assert same.lam.item() == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0, lam=1.0), r"n .*\[1, 16\].*0"),
    (dict(n=17, lam=1.0), r"n .*\[1, 16\].*17"),
    (dict(n=2.5, lam=1.0), r"n "),
    (dict(n=4, lam=0.0), r"lam .*> 0"),
    (dict(n=4, lam=-1.0), r"lam .*-1"),
    (dict(n=4, lam=float("nan")), r"lam .*finite"),
    (dict(n=4, lam=float("inf")), r"lam .*finite"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HMTNeuron(**kwargs)


@pytest.mark.parametrize("lam", ["0.1", None, True])
def test_a_threshold_that_is_no_number_is_named(lam):  # (were torch's own words, or True taken as 1)
    with pytest.raises(TypeError, match="lam must be a number or a tensor of numbers, got"):
        HMTNeuron(4, lam)


def test_shape_errors_name_the_shapes():
    neuron = HMTNeuron(4, torch.ones(3, 1, 1))
    with pytest.raises(ValueError, match=r"\(3, 1, 1\).*\(2, 4, 4\)"):
        neuron(torch.zeros(4, 2, 4, 4))  # [T, C=2...] where lam has 3 channels
    with pytest.raises(ValueError, match="time dimension"):
        neuron(torch.zeros(3, 4, 4))  # a [C, H, W] input without T
    with pytest.raises(ValueError, match="T >= 1"):
        HMTNeuron(4, 1.0)(torch.tensor(1.0))
    x = torch.rand(4, 30, 50)
    for out in (torch.empty(1, 1, 1), torch.empty(4, 50, 30), torch.empty(4, 30, 50, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"out must be like the input \(\(4, 30, 50\), torch.float32"):
            HMTNeuron(4, 0.1)(x, out=out)  # (the kernel wrote past a small buffer: a crash)


def test_mt_neuron_levels_and_reset():
    mt = MTNeuron(4, theta=1.0)  # segments of 0.25, output up to 1.0
    out = mt(torch.tensor([[0.55], [0.55]]))
    # v0 = 0.125: m = 0.675 -> j = 2 (0.5), v = 0.175; m = 0.725 -> j = 2, v = 0.225
    assert torch.allclose(out.flatten(), torch.tensor([0.5, 0.5]))
    assert mt.spikes.tolist() == [2.0, 2.0]


def test_mt_membrane_unbounded_where_hmt_stays_bounded():
    """Appendix A: with the same largest threshold theta, the equal-segment neuron tops out at theta
    per step, so an input of 1.5 theta piles up in its membrane; H-MT represents it and stays bounded."""
    n, theta, T = 4, 1.0, 200
    x = torch.full((T, 1), 1.5 * theta, dtype=torch.float64)
    lam = theta / 2 ** (n - 1)
    mt_out = MTNeuron(n, theta)(x)
    hmt_out = HMTNeuron(n, lam)(x)
    mt_membrane = x.sum() + theta / (2 * n) - mt_out.sum()  # eq. 8: v[T] = v[0] + T z - T phi
    hmt_membrane = x.sum() + lam / 2 - hmt_out.sum()
    assert mt_membrane > 0.49 * T * theta  # grows linearly with T
    assert 0 <= hmt_membrane < lam  # bounded in [0, lam)


@pytest.mark.parametrize("levels", [15, 255])  # the checked rounded quotient; ATen's floor division
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_level_is_the_exact_floor_of_the_rational_quotient(dtype, per_channel, levels):
    """The level of one step against exact rational arithmetic (Fractions), on the values where a
    rounded quotient fails: every rounded product j*lam, j = 0..16, one ulp either side, and a few
    ulps above. One threshold per column when ``per_channel``, else one per call."""
    from fractions import Fraction

    from hmtconv.neurons.multilevel import fire_
    g = torch.Generator().manual_seed(0)
    lams = torch.cat([torch.tensor([0.1, 0.3, 1 / 3, 0.7, 1e-3, 123.456]), torch.rand(10, generator=g) * 5 + 1e-4])
    lams = lams.to(dtype)
    multiples = torch.arange(0, 17, dtype=dtype).unsqueeze(1) * lams  # [17, lams]
    eps = torch.finfo(dtype).eps
    m = torch.cat([multiples, torch.nextafter(multiples, torch.full_like(multiples, -1e30)),
                   torch.nextafter(multiples, torch.full_like(multiples, 1e30)), multiples * (1 + 4 * eps),
                   multiples * (1 + 8 * eps), torch.randn(200, len(lams), generator=g, dtype=dtype) * 10 * lams])
    columns = [(m, lams)] if per_channel else [(m[:, j], lams[j]) for j in range(len(lams))]
    naive_wrong = 0
    for mm, lam in columns:
        k = fire_(torch.zeros_like(mm), mm, lam, levels, *(torch.empty_like(mm) for _ in range(3)))
        lam_b = lam.expand_as(mm)
        exact = [min(max(Fraction(x) // Fraction(step), 0), levels) for x, step in zip(mm.flatten().tolist(),
                                                                                      lam_b.flatten().tolist())]
        assert k.flatten().tolist() == exact
        naive_wrong += (torch.div(mm, lam).floor().clamp(0, levels).flatten() != torch.tensor(exact, dtype=dtype)).sum()
    if dtype == torch.float32:  # the data does hit the rounded quotient's off-by-one (float64 has no case here)
        assert naive_wrong > 0


@pytest.mark.parametrize("communicate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_signed_neuron_over_sign_changes_with_fanout_equals_literal(communicate, dtype):
    """64 steps whose input flips sign halfway (eq. 21's exchange matters most there), with a
    fan-out map: output, spikes per step and fan-out-weighted spikes per step against the literal
    sequential neuron, element by element, bit for bit."""
    g = torch.Generator().manual_seed(3)
    T, lam, n = 64, 0.3, 3
    sign = torch.where(torch.arange(T) < T // 2, 1.0, -1.0).view(T, 1, 1)
    x = ((torch.randn(5, 7, generator=g) * sign + 0.3 * torch.randn(T, 5, 7, generator=g)) * lam * 4).to(dtype)
    fanout = torch.randint(1, 9, (7,), generator=g).to(torch.float32)
    neuron = HMTNeuron(n, lam, signed=True, communicate=communicate)
    neuron.fanout = fanout
    out = neuron(x)
    ref, ref_spikes = hmt_literal(x, lam, n, signed=True, communicate=communicate)
    per_element = torch.stack([s_pos + s_neg for _, _, s_pos, s_neg in hmt_literal_membranes(x, lam, n, communicate)])
    assert torch.equal(out, ref) and torch.equal(neuron.spikes, ref_spikes)
    assert torch.equal(neuron.synops, (per_element.double() * fanout.double()).sum((1, 2)))
    assert (per_element[T // 2:] > 0).any()  # the neuron does fire after the flip


def test_communication_cuts_the_unevenness_error_of_fluctuating_input():
    """Eq. 21's purpose: with an input whose sign changes from step to step, the average output
    tracks the average input several times better with communication; with a constant input it
    changes nothing (one half never fires)."""
    g = torch.Generator().manual_seed(0)
    mean = (torch.rand(5000, generator=g, dtype=torch.float64) * 2 - 1) * 10

    def err(x, communicate):
        return (HMTNeuron(4, 1.0, signed=True, communicate=communicate)(x).mean(0) - x.mean(0)).abs().mean()

    noisy = mean + 4 * torch.randn(16, mean.numel(), generator=g, dtype=torch.float64)
    assert err(noisy, False) > 3 * err(noisy, True)
    steady = mean.expand(16, -1)
    assert torch.equal(HMTNeuron(4, 1.0, signed=True)(steady), HMTNeuron(4, 1.0, signed=True, communicate=False)(steady))


def test_communication_counts_both_halves_where_rounding_lets_both_fire():
    """Lemma 4.1 (at most one half fires per step) holds in exact arithmetic; in bfloat16, with
    inputs of hundreds of lam, the membranes' rounding breaks it and both halves fire. The tensor
    path then counts both halves' spikes (it added their levels, past the spike table's end)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 4096, generator=g) * 30).to(torch.bfloat16)
    neuron = HMTNeuron(2, 0.1, signed=True, communicate=True).to(torch.bfloat16)
    out = neuron(x)
    lam = torch.tensor(0.1, dtype=torch.bfloat16)
    v_pos, v_neg = (lam / 2).expand(4096).clone(), (lam / 2).expand(4096).clone()
    both = False
    for t in range(16):  # eq. 21 with the neuron's order of operations, each half's spikes by the greedy thresholds
        out_pos, _, s_pos = basal_fire(v_pos, x[t], lam, 2)
        out_neg, _, s_neg = basal_fire(v_neg, -x[t], lam, 2)
        step = out_pos - out_neg
        v_pos, v_neg = (v_pos + x[t]) - step, (v_neg - x[t]) + step
        both |= bool(((s_pos > 0) & (s_neg > 0)).any())
        assert torch.equal(out[t], step) and neuron.spikes[t] == (s_pos + s_neg).double().sum()
    assert both
