"""Observers (streaming, mergeable statistics) and threshold policies."""
import pytest
import torch

from hmtconv.conversion import ActivationObserver, NeuronSpec
from hmtconv.conversion.policies import compute_lam


def _fill(obs, batches):
    for b in batches:
        obs(b)
    return obs


@pytest.fixture
def batches():
    torch.manual_seed(0)
    return [torch.randn(8, 3, 5, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 0.3 for _ in range(5)]


def test_streaming_moments_equal_full_data(batches):
    obs = _fill(ActivationObserver(signed=False), batches)
    full = torch.cat(batches).double()
    mu, sigma = obs.moments(per_channel=False)
    assert torch.allclose(mu, full.mean()) and torch.allclose(sigma, full.std(unbiased=False))
    mu_c, sigma_c = obs.moments(per_channel=True)
    assert torch.allclose(mu_c, full.mean((0, 2, 3)))
    assert torch.allclose(sigma_c, full.transpose(0, 1).reshape(3, -1).std(1, unbiased=False))
    assert torch.allclose(obs.maximum(False), full.max()) and torch.allclose(obs.maximum(True), full.amax((0, 2, 3)))


def test_merge_equals_single_pass(batches):
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
