"""Agreement with the ANN, spikes through step t, and answering a smaller T from one run."""
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import hmtconv.conversion as hc
from hmtconv.sweep import simulations

from test_convert_snn import loader, small_cnn


def test_agreement_and_spikes_against_a_direct_computation():
    model, data = small_cnn(), loader()
    snn = hc.convert(model, data, n=2, T=5, policy="999")
    result = hc.evaluate(snn, data, ann=model)
    agree, spikes = torch.zeros(5), torch.zeros(5)
    for x, _ in data:  # the definition, batch by batch: argmax of the mean logits of steps 1..t vs the ANN's
        out = snn(x)
        mean = out.cumsum(0) / torch.arange(1, 6).view(5, 1, 1)
        agree += (mean.argmax(-1) == model(x).argmax(-1)).sum(1)
        spikes += sum(site.neuron.spikes for site in snn.sites().values()).float()
    assert result.agreement == pytest.approx((100 * agree / 24).tolist())
    assert result.spikes_cumulative == pytest.approx((spikes.cumsum(0) / 24).tolist())
    assert result.spikes_cumulative[-1] == pytest.approx(result.spikes_per_sample)
    assert hc.evaluate(snn, data).agreement is None  # no ANN given


class WritesOverActivations(nn.Module):
    """In-place ops after the neurons: on a ReLU's output, and on a signed site's input."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h.mul_(0.5)
        g = self.b(h)
        out = self.fc(g)
        g.add_(1.0)
        return out


def test_per_layer_error_against_a_direct_computation():
    """Mean |ANN activation - SNN mean output| of each site: the ANN's activations computed apart,
    the SNN's outputs caught by hooks, in-place ops after the sites included."""
    torch.manual_seed(0)
    model = WritesOverActivations().eval()
    data = [(torch.randn(16, 6), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    snn = hc.convert(model, data, n=2, T=6, policy="999", identity="all")
    sites = snn.sites()
    assert {name: site.output_mutated for name, site in sites.items()} == {"relu": True, "a_in": False, "fc_in": True}
    outputs = {}
    hooks = [site.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out.clone()))
             for name, site in sites.items()]
    errors = {name: 0.0 for name in sites}
    for x, _ in data:
        snn(x)
        with torch.no_grad():
            relu = torch.relu(model.a(x))
            ann = {"relu": relu, "a_in": x, "fc_in": model.b(relu * 0.5)}
        for name in sites:
            errors[name] += (outputs[name].view(6, *x.shape[:1], -1).mean(0) - ann[name]).abs().sum().item()
    for h in hooks:
        h.remove()
    result = hc.evaluate(snn, data)
    assert [layer.mean_abs_error for layer in result.per_layer] == pytest.approx(
        [errors[name] / (32 * ann[name].shape[1]) for name in sites], rel=1e-5)


def test_wall_clock_seconds_are_reported_but_not_a_result():
    model, data = small_cnn(), loader()
    snn = hc.convert(model, data, n=2, T=5, policy="999")
    first, second = hc.evaluate(snn, data, ann=model), hc.evaluate(snn, data, ann=model)
    assert first.seconds["ann"] > 0 and first.seconds["snn"] > 0 and first.seconds["diagnostics"] > 0
    assert hc.evaluate(snn, data, diagnostics=False).seconds["diagnostics"] == 0  # timed apart from the SNN
    assert first == second and first == dataclasses.replace(first, seconds={"ann": -1.0})  # (never the clock)
    assert "seconds" not in first.to_dict()


def test_first_t_steps_of_a_run_equal_a_run_of_t_steps():
    """Causality: with T-independent thresholds, steps 1..t of a long run are a run of t steps."""
    model, data = small_cnn(), loader()
    snn = hc.convert(model, data, n=3, T=6, policy="999")
    long = hc.evaluate(snn, data, ann=model, diagnostics=False)
    assert [layer.firing_rates[-1] for layer in long.per_layer] == [layer.firing_rate for layer in long.per_layer]
    for t in (1, 3, 6):
        short = hc.evaluate(snn, data, T=t, ann=model, diagnostics=False)
        cut = long.truncated(t)
        for key in ("snn_accuracy", "agreement", "energy_ratio", "spikes_cumulative", "synops_cumulative"):
            assert getattr(cut, key) == pytest.approx(getattr(short, key), rel=1e-12), key
        assert cut.spikes_per_sample == pytest.approx(short.spikes_per_sample, rel=1e-12)
        assert cut.macs == short.macs
        for a, b in zip(cut.per_layer, short.per_layer, strict=True):  # (they were the long run's)
            assert a.firing_rate == pytest.approx(b.firing_rate, rel=1e-12) and len(a.firing_rates) == t
            assert a.firing_rates == pytest.approx(b.firing_rates, rel=1e-12) and a.mean_abs_error is None
    with pytest.raises(ValueError, match="1..6 steps, not 7"):
        long.truncated(7)
    measured = hc.evaluate(snn, data, ann=model)  # (the per-layer errors are of the average of all 6 steps)
    assert all(layer.mean_abs_error is not None for layer in measured.per_layer)
    assert all(layer.mean_abs_error is None for layer in measured.truncated(3).per_layer)
    assert measured.truncated(6) == measured


def test_sweep_simulates_T_independent_policies_once():
    points = [{"policy": p, "n": 4, "T": t} for p in ("opt", "999", 99.0) for t in (1, 2, 4)]
    runs = simulations(points)
    assert sorted((steps, len(group)) for steps, group in runs) == [(1, 1), (2, 1), (4, 1), (4, 3), (4, 3)]
    for steps, group in runs:
        if group[0]["policy"] != "opt":
            assert {p["T"] for p in group} == {1, 2, 4}


def test_evaluating_at_another_T_than_opts_own_warns():
    """opt's thresholds depend on T (eqs. 23-29): evaluate(T=...) runs them for other steps."""
    model, data = small_cnn(), loader()
    with pytest.warns(UserWarning, match=r"evaluating at T=8 an SNN whose thresholds \(policy 'opt'\) were chosen "
                                         r"for T=4; convert with T=8"):
        hc.evaluate(hc.convert(model, data, n=3, T=4, policy="opt"), data, T=8, diagnostics=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hc.evaluate(hc.convert(model, data, n=3, T=4, policy="999"), data, T=8, diagnostics=False)
