"""Observers (streaming, mergeable statistics) and threshold policies."""
import functools

import numpy as np
import pytest
import torch

import hmtconv.conversion as hc
from hmtconv.conversion import ActivationObserver, NeuronSpec
from hmtconv.conversion.observers import HistogramConfig
from hmtconv.theory import fixed_point_lam, optimal_lam
from hmtconv.conversion.policies import (compute_lam, compute_lams, depends_on_T, parse_policy, policy_for_site,
                                         unused_patterns)


def _fill(obs, batches):
    for b in batches:
        obs(b)
    return obs


@pytest.fixture(params=["kernel", "tensor"])
def path(request, monkeypatch):
    """Observers on the compiled CPU kernel (where a compiler exists) and on the tensor path."""
    monkeypatch.setenv("HMTCONV_CPU_KERNEL", "1" if request.param == "kernel" else "0")
    return request.param


@pytest.fixture
def batches():
    torch.manual_seed(0)
    return [torch.randn(8, 3, 5, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 0.3 for _ in range(5)]


def test_streaming_moments_equal_full_data(batches, path):
    obs = _fill(ActivationObserver(signed=False), batches)
    full = torch.cat(batches).double()
    mu, sigma = obs.moments(per_channel=False)
    assert torch.allclose(mu, full.mean()) and torch.allclose(sigma, full.std(unbiased=False))
    mu_c, sigma_c = obs.moments(per_channel=True)
    assert torch.allclose(mu_c, full.mean((0, 2, 3)))
    assert torch.allclose(sigma_c, full.transpose(0, 1).reshape(3, -1).std(1, unbiased=False))
    assert torch.allclose(obs.maximum(False), full.max()) and torch.allclose(obs.maximum(True), full.amax((0, 2, 3)))


def test_merge_equals_single_pass(batches, path):
    one = _fill(ActivationObserver(signed=True), batches)
    a = _fill(ActivationObserver(signed=True), batches[:2])
    b = _fill(ActivationObserver(signed=True), batches[2:])
    a.merge(b)
    for name, value in one.state_dict().items():
        assert torch.allclose(value, a.state_dict()[name]), name


def test_quantile_of_whole_set_within_bin_precision(batches):
    obs = _fill(ActivationObserver(signed=False), batches)
    out = torch.cat(batches).clamp_min(0).double()
    width = 2 ** (1 / obs.hist.bins_per_octave) - 1  # relative bin width: the error bound
    for q in (0.5, 0.99, 0.999):
        exact = torch.quantile(out.flatten(), q)
        assert abs(obs.quantile(q, False) / exact - 1) < width
    exact_c = torch.quantile(out.transpose(0, 1).reshape(3, -1), 0.99, dim=1)
    assert torch.allclose(obs.quantile(0.99, True), exact_c, rtol=width)


def test_quantile_in_the_open_last_bin_ends_at_the_largest_value():
    """Values beyond the histograms' range share the last bin, closed at the maximum: a quantile
    there lies between its lower edge and the maximum (it was capped at the edge), and convert says
    that precision is lost and how to widen the range."""
    torch.manual_seed(0)
    hist = HistogramConfig(min_exp=-4, max_exp=4, bins_per_octave=8)
    x = 1000.0 + torch.rand(64, 3, 4)
    obs = ActivationObserver(signed=False, hist=hist)
    obs(x)
    for per_channel in (False, True):
        value = obs.quantile(0.999, per_channel)
        assert torch.all(value > 2.0**4) and torch.all(value <= obs.maximum(per_channel))
        assert torch.all(value > 0.99 * 1000)  # geometric from 16 to about 1001: 0.999 of the way
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.normal_(0.0, 100.0), model[0].bias.fill_(70000.0)
    with pytest.warns(UserWarning, match=r"activations up to 7[.0-9]*e\+04 at 1, beyond the histograms' range "
                                         r"\(2\*\*16\).*HistogramConfig\(max_exp=18\)"):
        hc.convert(model, [(torch.rand(8, 4) + 0.5, torch.zeros(8, dtype=torch.long))], policy="999")


def test_activations_below_the_histograms_are_warned_with_the_range_that_resolves_them():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-6), model[0].bias.mul_(1e-6)
    data = [(torch.rand(256, 4), torch.zeros(256, dtype=torch.long))]
    with pytest.warns(UserWarning, match=r"all below the histograms' range \(2\*\*-16\) at 1 .*"
                                         r"HistogramConfig\(min_exp=-2[0-9]\)") as record:
        hc.convert(model, data, policy="999")
    min_exp = int(str(record[0].message).split("min_exp=")[1].split(")")[0])
    prepared = hc.calibrate(hc.prepare(model, histogram=HistogramConfig(min_exp=min_exp, max_exp=0)), data)
    lam = hc.convert(prepared, policy="999").sites()["1"].neuron.lam
    with torch.no_grad():
        expected = torch.quantile(model[0](data[0][0]).relu().flatten().double(), 0.999) / 15
    assert abs(float(lam) / float(expected) - 1) < 0.03  # one bin of 32 an octave: 2.2 %


@pytest.mark.parametrize("scale", [1e-6, 1.0])
def test_quantiles_never_exceed_the_largest_value(scale, path):
    """The bin holding the maximum ends at it: no quantile of a channel (a constant one included)
    exceeds its largest value, the 100th percentile is that value, and values below the
    histograms' first edge (bin 0, here up to 2**-20 against 2**-16) get quantiles near
    torch.quantile's, not near 2**-16."""
    torch.manual_seed(0)
    x = torch.rand(64, 3, 4, 4) * scale
    x[:, 1] = 0.7 * scale
    obs = ActivationObserver(signed=False)
    obs(x)
    exact = torch.quantile(x.double().transpose(0, 1).reshape(3, -1), 0.999, dim=1)
    width = 2 ** (1 / obs.hist.bins_per_octave) - 1
    for per_channel in (False, True):
        top = obs.maximum(per_channel)
        for q in (0.5, 0.999, 1.0):
            assert torch.all(obs.quantile(q, per_channel) <= top)
        torch.testing.assert_close(obs.quantile(1.0, per_channel), top, rtol=1e-12, atol=0)
    torch.testing.assert_close(obs.quantile(0.999, True), exact, rtol=width, atol=0)
    spec = NeuronSpec("hmt", 4, T=4, signed=False, per_channel=True)
    assert torch.equal(compute_lam(obs, spec, 100.0), compute_lam(obs, spec, "max"))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", [(6, 3, 5, 5), (6, 7, 4), (6, 40)])
@pytest.mark.parametrize("hist", [HistogramConfig(), HistogramConfig(min_exp=-4, max_exp=6, bins_per_octave=8)],
                         ids=["default", "coarse"])
def test_histograms_equal_brute_force_binning(signed, shape, hist, path):
    """Every count against a value-by-value search of the bin edges ``2**(min_exp + k/32)`` in
    float64, per channel (dim 1 of conv, the last dim of tokens) and for the layer; values include
    zeros, values below the first edge and beyond the last."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * torch.logspace(-6, 6, shape[0] * 2, base=2.0).view(-1, *[1] * (len(shape) - 1))[::2]
    x.view(-1)[::17] = 0.0
    x.view(-1)[1] = 2.0**-20
    x.view(-1)[2] = 2.0**20
    obs = ActivationObserver(signed=signed, hist=hist)
    obs(x)
    dim = 2 if len(shape) == 3 else 1
    out = (x.abs() if signed else x.clamp_min(0)).double().movedim(dim, 0).reshape(shape[dim], -1)
    cfg = obs.hist
    upper = torch.exp2(cfg.min_exp + torch.arange(cfg.bins - 1, dtype=torch.float64) / cfg.bins_per_octave)
    expected = torch.zeros(shape[dim], cfg.bins, dtype=torch.int64)
    for c, row in enumerate(out):
        for value in row.tolist():
            expected[c, int(torch.searchsorted(upper, torch.tensor(value, dtype=torch.float64), right=True))] += 1
    assert torch.equal(obs.hist_channel, expected)
    assert torch.equal(obs.histogram(per_channel=False)[0][0], expected.sum(0))


@pytest.mark.parametrize("signed", [False, True])
def test_layer_histogram_is_the_sum_of_the_channels_or_kept_alone(signed, path):
    """With per-channel histograms the layer's counts are their sum (not stored twice); without
    them the layer's own histogram gives the same counts and percentiles; per-channel ones then
    name the setting they need."""
    g = torch.Generator().manual_seed(1)
    both, alone = ActivationObserver(signed), ActivationObserver(signed, HistogramConfig(per_channel=False))
    for _ in range(2):
        x = torch.randn(5, 4, 6, 6, generator=g) * torch.tensor([0.1, 1.0, 10.0, 100.0]).view(4, 1, 1)
        both(x)
        alone(x)
    assert both.hist_layer.numel() == 0 and alone.hist_channel.numel() == 0
    assert torch.equal(both.histogram(False)[0], both.hist_channel.sum(0, keepdim=True))
    assert torch.equal(both.histogram(False)[0], alone.histogram(False)[0])
    assert torch.equal(both.quantile(0.999, False), alone.quantile(0.999, False))
    for read in (alone.histogram, lambda per_channel: alone.quantile(0.99, per_channel)):
        with pytest.raises(ValueError, match=r"HistogramConfig\(per_channel=True\)"):
            read(True)


def test_token_activations_use_last_dim_and_state_dict_roundtrip():
    obs = ActivationObserver(signed=True)
    obs(torch.randn(4, 7, 6))
    assert obs.ch_mean.shape == (6,)
    fresh = ActivationObserver(signed=True)
    fresh.load_state_dict(obs.state_dict())
    assert torch.equal(fresh.hist_channel, obs.hist_channel)


@pytest.mark.parametrize("kind,n,levels", [("hmt", 4, 15), ("mt", 4, 4), ("if", 1, 1)])
def test_percentile_policies(batches, kind, n, levels):
    obs = _fill(ActivationObserver(signed=False), batches)
    spec = NeuronSpec(kind, n, T=4, signed=False, per_channel=False)
    q = obs.quantile(99.9 / 100, False)
    assert torch.isclose(compute_lam(obs, spec, "999").double(), q / levels, rtol=1e-4)
    assert torch.isclose(compute_lam(obs, spec, "999x2").double(), 2 * q / levels, rtol=1e-4)
    assert torch.isclose(compute_lam(obs, spec, "max").double(), obs.maximum(False) / levels, rtol=1e-4)
    assert torch.isclose(compute_lam(obs, spec, 99.0).double(), obs.quantile(0.99, False) / levels, rtol=1e-4)


def test_channel_lam_shape_and_opt_policies(batches):
    obs = _fill(ActivationObserver(signed=False), batches)
    spec = NeuronSpec("hmt", 4, T=4, signed=False, per_channel=True)
    for policy in ("opt", "opt1500", "999"):
        lam = compute_lam(obs, spec, policy)
        assert lam.shape == (3, 1, 1) and bool((lam > 0).all())


def test_many_sites_at_once_equal_one_at_a_time(batches):
    """compute_lams solves the Gaussian policies of all sites in one call: every site's lam must
    equal its own conversion's, with signed and unsigned, layer and channel, and mixed policies
    (including a dead channel, which takes the layer's lam)."""
    dead = [b.clone() for b in batches]
    for b in dead:
        b[:, 1] = -b[:, 1].abs() - 0.1
    observers = [_fill(ActivationObserver(signed=signed), data) for signed in (False, True) for data in (batches, dead)]
    requests = [(obs, NeuronSpec("hmt", 4, 16, obs.signed, per_channel), policy)
                for obs in observers for per_channel in (False, True) for policy in ("opt", "999")]
    requests += [(obs, NeuronSpec("hmt", 2, 1, obs.signed, True), "opt") for obs in observers]  # another batch
    requests += [(observers[i], NeuronSpec("hmt", 4, 16, observers[i].signed, i == 3), "opt1500") for i in (1, 3)]
    for (obs, spec, policy), lam in zip(requests, compute_lams(requests)):
        assert torch.equal(lam, compute_lams([(obs, spec, policy)])[0]), (spec, policy)
    assert compute_lams([]) == []


def test_unknown_policy_is_a_clear_error(batches):
    obs = _fill(ActivationObserver(signed=False), batches)
    with pytest.raises(ValueError, match="unknown threshold policy 'best'"):
        compute_lam(obs, NeuronSpec("hmt", 4, 4, False, False), "best")


def test_dead_channel_takes_the_layer_threshold(batches):
    """A channel that never fired in calibration must not get a vanishing threshold (it would fire
    at full rate on the first positive input); it shares the layer's instead."""
    dead = [b.clone() for b in batches]
    for b in dead:
        b[:, 1] = -b[:, 1].abs() - 0.1  # channel 1 never positive
    obs = _fill(ActivationObserver(signed=False), dead)
    per_channel = compute_lam(obs, NeuronSpec("hmt", 4, 4, False, True), "999").flatten()
    layer = compute_lam(obs, NeuronSpec("hmt", 4, 4, False, False), "999")
    assert per_channel[1] == layer
    assert per_channel[0] != layer and per_channel[2] != layer


@pytest.mark.parametrize("signed,mu", [(False, 0.3), (True, 0.2), (True, -0.5)])
def test_opt_emp_recovers_the_gaussian_optimum(signed, mu):
    """On Gaussian data the histogram optimum must agree with the exact Gaussian theory
    (up to the histogram's 4.4 % bins)."""
    from hmtconv.theory import optimal_lam

    g = torch.Generator().manual_seed(1)
    obs = ActivationObserver(signed=signed)
    for _ in range(8):
        obs(torch.randn(50_000, 4, generator=g) + mu)
    for n, T in ((4, 4), (2, 8), (8, 2)):
        spec = NeuronSpec("hmt", n, T, signed, per_channel=False)
        expected = optimal_lam(mu, 1.0, n, T, signed).item()
        assert compute_lam(obs, spec, "opt-emp").item() == pytest.approx(expected, rel=0.05)


def test_opt_emp_minimizes_the_empirical_error():
    """Brute force over a dense lam grid of the same discretised error: no candidate does better."""
    from hmtconv.conversion.empirical import POINTS, _errors, empirical_lam

    obs = ActivationObserver(signed=False)
    torch.manual_seed(2)
    obs(torch.distributions.Exponential(1.0).sample((20_000, 3)) * torch.tensor([1.0, 3.0, 0.2]))
    counts, lo, hi = obs.histogram(per_channel=True)
    lam = empirical_lam(counts, lo, hi, obs.maximum(True), levels=15, T=4)
    used = counts.sum(0) > 0
    frac = (torch.arange(POINTS, dtype=torch.float64) + 0.5) / POINTS
    x = (lo[used, None] + frac * (hi[used] - lo[used])[:, None]).flatten()
    w = (counts[:, used].double() / POINTS).repeat_interleave(POINTS, dim=1)
    dense = (obs.maximum(True).double() / 15)[:, None] * torch.logspace(-8, 0, 4000, base=2, dtype=torch.float64)
    best = _errors(dense, x, w, 4, 60).min(1).values
    mine = _errors(lam[:, None], x, w, 4, 60).squeeze(1)
    assert (mine <= best * (1 + 1e-6)).all()
    assert not torch.equal(lam[0], lam[1])  # channels get their own thresholds


def test_empirical_error_is_the_mean_error_of_the_calibration_values():
    """Against eq. 24's quantizer run on the raw values themselves (the histogram's points: within 2 %)."""
    from hmtconv.conversion.empirical import empirical_error

    obs = ActivationObserver(signed=False)
    torch.manual_seed(3)
    values = torch.distributions.Exponential(1.0).sample((50_000, 2)) * torch.tensor([1.0, 0.3])
    obs(values)
    counts, lo, hi = obs.histogram(per_channel=True)
    lam, T, levels = torch.tensor([0.2, 0.01], dtype=torch.float64), 4, 15  # clipping at 3.0 and 0.15
    x, h = values.double(), lam / T
    direct = ((h * torch.clamp(torch.floor(x / h + 0.5), 0, T * levels) - x) ** 2).mean(0)
    torch.testing.assert_close(empirical_error(counts, lo, hi, lam, levels, T), direct, rtol=0.02, atol=0)


def test_policy_with_site_overrides_parses_and_picks_the_last_match():
    base, overrides = parse_policy("opt, *.mix_in0=999, layer1.*=99.5 ,layer1.0.relu=opt-emp")
    assert base == "opt" and overrides == [("*.mix_in0", "999"), ("layer1.*", 99.5), ("layer1.0.relu", "opt-emp")]
    assert policy_for_site("opt,layer1.*=99.5,layer1.0.relu=opt-emp", "layer1.0.relu") == "opt-emp"
    assert policy_for_site("opt,layer1.*=99.5,layer1.0.relu=opt-emp", "layer1.1.relu") == 99.5
    assert policy_for_site("opt,layer1.*=99.5", "layer2.0.relu") == "opt"
    assert policy_for_site(99.9, "any") == 99.9 and parse_policy("999") == ("999", [])
    assert not depends_on_T("999,*.x=max") and depends_on_T("999,*.x=opt") and depends_on_T("opt-emp")
    assert unused_patterns("opt,a*=999,zz=max", ["ab", "b"]) == ["zz"]


def test_a_registered_policy_is_used_by_name_and_declares_its_T_dependence():
    from hmtconv.conversion.policies import POLICIES, T_DEPENDENT

    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)).eval()
    data = [(torch.randn(16, 4), torch.zeros(16, dtype=torch.long))]
    hc.register_policy("test-half-max")(lambda obs, spec: obs.maximum(spec.per_channel) / spec.levels / 2)
    hc.register_policy("test-max-over-T", t_dependent=True)(lambda obs, spec: obs.maximum(spec.per_channel) / spec.T)
    try:
        for granularity in ("layer", "channel"):
            lams = {p: hc.convert(model, data, policy=p, granularity=granularity).sites()["1"].neuron.lam
                    for p in ("max", "test-half-max", "opt,1=test-half-max")}
            torch.testing.assert_close(2 * lams["test-half-max"], lams["max"])
            torch.testing.assert_close(lams["opt,1=test-half-max"], lams["test-half-max"])
        assert not depends_on_T("test-half-max") and depends_on_T("opt,1=test-max-over-T")
        with pytest.raises(ValueError, match="already registered"):
            hc.register_policy("max")(lambda obs, spec: None)
        for name, error in ((5, TypeError), ("a,b", ValueError), ("50", ValueError), ("", ValueError)):
            with pytest.raises(error, match="takes the policy's name first|cannot be used in a policy string"):
                hc.register_policy(name)
        bad = {"test-negative": lambda obs, spec: -obs.maximum(spec.per_channel) / spec.levels,  # (was clamped)
               "test-nan": lambda obs, spec: torch.full_like(obs.maximum(spec.per_channel), float("nan")),
               "test-shape": lambda obs, spec: torch.ones(7), "test-text": lambda obs, spec: "0.1"}
        for name, fn in bad.items():
            hc.register_policy(name)(fn)
        for name, message in (("test-negative", r"lam must be finite and >= 0"), ("test-nan", "finite"),
                              ("test-shape", r"returned 7 values; it must return 1 \(shape \[\]\)"),
                              ("test-text", "not a number or tensor")):
            with pytest.raises((ValueError, TypeError), match=rf"threshold policy '{name}' at 1 \(per layer\).*{message}"):
                hc.convert(model, data, policy=name)
    finally:
        for name in ("test-half-max", "test-max-over-T", "test-negative", "test-nan", "test-shape", "test-text"):
            POLICIES.pop(name), T_DEPENDENT.discard(name)


def test_a_one_shot_convert_gathers_only_the_statistics_its_policy_reads(monkeypatch):
    """convert(model, loader, policy=...) skips the histograms (the costliest statistics) for
    policies that read moments and maxima only, and keeps per-channel ones only for per-channel
    thresholds; its thresholds equal those of a full calibration."""
    import hmtconv.conversion.api as api
    from hmtconv.conversion.policies import NO_HISTOGRAM, POLICIES, reads_histograms

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 16, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).eval()
    data = [(torch.randn(16, 2, 6, 6), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    full = hc.calibrate(hc.prepare(model), data)
    seen = []
    monkeypatch.setattr(api, "prepare", lambda *a, real=api.prepare, **k: seen.append(k["histogram"]) or real(*a, **k))
    hc.register_policy("test-moments", histogram=False)(lambda obs, spec: obs.moments(spec.per_channel)[1])
    hc.register_policy("test-reads-any")(lambda obs, spec: obs.maximum(spec.per_channel) / spec.levels)
    try:
        layer, channel = HistogramConfig(per_channel=False), HistogramConfig()
        for policy, granularity, gathered in (("opt", "layer", None), ("opt1500", "channel", None),
                                              ("max", "channel", None), ("opt,4=max", "layer", None),
                                              ("test-moments", "layer", None), ("test-reads-any", "layer", layer),
                                              ("999", "layer", layer), ("opt,4=99.5", "layer", layer),
                                              ("opt-emp", "channel", channel), ("999x2,1=opt", "channel", channel)):
            seen.clear()
            snn = hc.convert(model, data, policy=policy, granularity=granularity)
            assert seen == [gathered] and reads_histograms(policy) == (gathered is not None), policy
            ref = hc.convert(full, policy=policy, granularity=granularity).state_dict()
            assert all(torch.equal(value, ref[key]) for key, value in snn.state_dict().items()), policy
    finally:
        for name in ("test-moments", "test-reads-any"):
            POLICIES.pop(name), NO_HISTOGRAM.discard(name)


@pytest.mark.parametrize("saved,into", [(HistogramConfig(bins_per_octave=4), HistogramConfig()),
                                        (None, HistogramConfig()), (HistogramConfig(), None),
                                        (HistogramConfig(), HistogramConfig(per_channel=False)),
                                        (HistogramConfig(per_channel=False), HistogramConfig(max_exp=17))])
def test_a_calibration_loaded_into_other_histograms_is_refused(saved, into):
    """Counts of other bins (or none) would be read, or counted into, past their end (the kernel
    wrote past a smaller buffer): loading says which site and what to prepare with."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 3))
    data = [(torch.randn(8, 2, 6, 6), torch.zeros(8, dtype=torch.long))]
    calibrated = hc.calibrate(hc.prepare(model.eval(), histogram=saved), data).state_dict()
    with pytest.raises(ValueError, match=r"^1\.observer: the saved statistics hold histograms of shape .* prepare "
                                         r"with the histogram setting of the saved calibration"):
        hc.prepare(model, histogram=into).load_state_dict(calibrated)
    same = hc.prepare(model, histogram=saved)
    same.load_state_dict(calibrated)
    assert torch.equal(hc.calibrate(same, data).state_dict()["1.observer.count"], 2 * calibrated["1.observer.count"])


def test_a_policy_registered_without_histograms_that_reads_them_is_named():
    from hmtconv.conversion.policies import NO_HISTOGRAM, POLICIES

    hc.register_policy("test-claims-moments", histogram=False)(lambda obs, spec: obs.quantile(0.99, False))
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)).eval()
    try:
        with pytest.raises(ValueError, match=r"threshold policy 'test-claims-moments' was registered with "
                                             r"histogram=False but reads the histograms \(1: calibrated without"):
            hc.convert(model, [(torch.randn(8, 4), torch.zeros(8))], policy="test-claims-moments")
    finally:
        POLICIES.pop("test-claims-moments"), NO_HISTOGRAM.discard("test-claims-moments")


def test_numpy_integers_configure_histograms():
    assert HistogramConfig(min_exp=np.int64(-8), bins_per_octave=np.int32(16)).bins == 24 * 16 + 1


def test_percentiles_of_a_calibration_without_histograms_are_a_clear_error(batches):
    obs = _fill(ActivationObserver(signed=False, hist=None), batches)
    spec = NeuronSpec("hmt", 4, 4, signed=False, per_channel=False)
    assert compute_lam(obs, spec, "opt") > 0 and compute_lam(obs, spec, "max") > 0
    for policy in ("999", 99.5, "opt-emp"):
        with pytest.raises(ValueError, match=r"calibrated without histograms .* percentile policies and opt-emp need "
                                             r"prepare\(model, histogram=HistogramConfig\(\)\)"):
            compute_lam(obs, spec, policy)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)).eval()
    prepared = hc.calibrate(hc.prepare(model, histogram=None), [(torch.randn(8, 4), torch.zeros(8))])
    with pytest.raises(ValueError, match="^1: calibrated without histograms"):
        hc.convert(prepared, policy="999")
    assert hc.convert(prepared, policy="opt").sites()["1"].neuron.lam > 0


@pytest.mark.parametrize("text,message", [("opt,*x", "not PATTERN=POLICY"), ("opt,*x=best", "unknown threshold"),
                                          ("best,*x=999", "unknown threshold"), ("opt,*x=150", r"\(0, 100\]"),
                                          (True, "policy must be")])
def test_policy_with_site_overrides_rejects_typos(text, message):
    with pytest.raises((ValueError, TypeError), match=message):
        parse_policy(text)


@pytest.mark.parametrize("kwargs,match", [(dict(min_exp=-126), "min_exp"), (dict(min_exp=4, max_exp=4), "min_exp"),
                                          (dict(max_exp=128), "max_exp"), (dict(bins_per_octave=0), "bins_per_octave"),
                                          (dict(bins_per_octave=2048), "bins_per_octave")])
def test_histogram_config_rejects_edges_it_cannot_bin_exactly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HistogramConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [(dict(min_exp=-16.5), "min_exp must be an int"),
                                          (dict(max_exp="16"), "max_exp must be an int"),
                                          (dict(bins_per_octave=True), "bins_per_octave must be an int"),
                                          (dict(per_channel="no"), "per_channel must be True or False")])
def test_histogram_config_names_a_field_of_the_wrong_type(kwargs, match):
    with pytest.raises(TypeError, match=match):
        HistogramConfig(**kwargs)


def test_half_precision_activations_bin_like_their_float32_values(path):
    """Half and bfloat16 values are exact in float32: the same counts as the float32 batch."""
    x = torch.randn(6, 3, 5, 5) * 100
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        a, b = ActivationObserver(signed=True), ActivationObserver(signed=True)
        a(low)
        b(low.float())
        assert torch.equal(a.hist_channel, b.hist_channel)


@pytest.mark.parametrize("other,match", [
    (lambda: ActivationObserver(signed=False, hist=HistogramConfig(min_exp=-20, max_exp=12)), "histogram"),
    (lambda: ActivationObserver(signed=True), "signed"),
])
def test_merge_refuses_observers_it_cannot_add(other, match):
    """Histograms with the same bin count but other edges (or of |x| against relu(x)) were added
    bin by bin without a word; per-sample shapes that forward refuses were merged too."""
    x = torch.randn(4, 3, 3, 3)
    a, b = ActivationObserver(signed=False), other()
    a(x), b(x)
    with pytest.raises(ValueError, match=match):
        a.merge(b)
    c = ActivationObserver(signed=False)
    c(torch.randn(4, 3, 5, 5))
    with pytest.raises(ValueError, match=r"per-sample shape \(3, 5, 5\) into those of \(3, 3, 3\)"):
        a.merge(c)


@pytest.mark.parametrize("text,part", [("opt,a=opt1500,b=-1", "in 'b=-1': percentile"),
                                       ("best,a=999", "the base 'best': unknown"),
                                       ("999,x=opt,y=bestt", "in 'y=bestt': unknown")])
def test_a_bad_part_of_a_policy_string_is_named(text, part):
    """An error about one item of 'BASE,PATTERN=POLICY,...' said only 'got -1.0', not which item."""
    with pytest.raises(ValueError, match=f"policy {text!r}: {part}".replace("(", r"\(").replace(")", r"\)")):
        parse_policy(text)


@pytest.mark.parametrize("neuron, n, levels", [("hmt", 4, 15), ("mt", 4, 4), ("if", 4, 1)])
@pytest.mark.parametrize("T", [2, 8])
@pytest.mark.parametrize("policy", ["opt", "opt1500"])
def test_convert_solves_each_site_for_its_own_inputs_moments(neuron, n, levels, T, policy):
    """End to end: each site's lam is the theory's for the population mean and spread of that
    site's input (computed here from the inputs themselves), its neuron's levels (H-MT 2^n - 1, MT
    n, IF 1), T and sign, and the neuron it gets tops out at levels * lam per step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    data = [(torch.randn(32, 6) + 0.3, torch.zeros(32, dtype=torch.long)) for _ in range(2)]
    snn = hc.convert(model, data, n=n, T=T, policy=policy, neuron=neuron, identity="all")
    x = torch.cat([images for images, _ in data]).double()
    with torch.no_grad():
        first = torch.nn.functional.linear(x, model[0].weight.double(), model[0].bias.double())
    inputs = {"0_in": (x, True), "1": (first, False)}  # (the ReLU's spikes go into the last layer as they are)
    solver = optimal_lam if policy == "opt" else functools.partial(fixed_point_lam, steps=1500)
    assert set(snn.sites()) == set(inputs)
    for name, (values, signed) in inputs.items():
        site = snn.sites()[name].neuron
        want = solver(values.mean(), values.std(unbiased=False), 1 if neuron == "if" else n, T, signed,
                      levels=levels if neuron == "mt" else None)
        torch.testing.assert_close(site.lam.double(), want, rtol=1e-6, atol=0, msg=name)
        top = site(torch.full((1, 1), 1e6))  # one step far above every threshold
        torch.testing.assert_close(top, (levels * site.lam).reshape(1, 1), rtol=1e-6, atol=0)
