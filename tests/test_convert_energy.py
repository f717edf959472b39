"""Energy counts (eqs. 31-32) against brute force on tiny networks."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hmtconv.conversion as hc
from hmtconv.conversion.energy import E_AC, E_MAC


def brute_force_fanout(layer, shape):
    """Connections of each input element: outputs that change when it changes (all weights nonzero,
    and at most one kernel tap links an input to an output without dilation)."""
    with torch.no_grad():
        layer.weight.copy_(torch.rand_like(layer.weight) + 0.5)
        base = torch.zeros(1, *shape)
        ref = layer(base)
        counts = torch.zeros(shape)
        for i in range(base.numel()):
            x = base.clone().view(-1)
            x[i] = 1.0
            counts.view(-1)[i] = ((layer(x.view(1, *shape)) - ref).abs() > 1e-7).sum()
    return counts


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
                                  nn.Conv2d(4, 4, (3, 2), stride=(1, 2), padding=(2, 0)),
                                  nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2)])
def test_fanout_and_macs_match_brute_force(conv):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), conv, nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(3)).eval()
    model(torch.zeros(1, 1, 7, 7))
    data = [(torch.randn(4, 1, 7, 7), torch.zeros(4, dtype=torch.long))]
    snn = hc.convert(model, data, n=2, T=3, policy="999")
    sites = snn.sites()
    expected = brute_force_fanout(snn.net.get_submodule("2"), (4, 7, 7))
    assert torch.equal(sites["1"].fanout, expected)
    assert torch.all(sites["3"].fanout == 3)  # each element feeds the 3 outputs of the Linear
    first = brute_force_fanout(nn.Conv2d(1, 4, 3, padding=1), (1, 7, 7)).sum()
    linear = snn.net.get_submodule("5")
    assert snn.mac_static == first  # the image is analog: MACs, counted once
    assert snn.mac_ann == first + expected.sum() + linear.in_features * 3


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2),
                                  nn.Conv1d(4, 4, 3, padding=2, dilation=2)])
def test_fanout_of_1d_convolutions_matches_brute_force(conv):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), conv, nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(3)).eval()
    model(torch.zeros(1, 1, 9))
    snn = hc.convert(model, [(torch.randn(4, 1, 9), torch.zeros(4, dtype=torch.long))], n=2, T=3, policy="999",
                     granularity="channel")
    assert torch.equal(snn.sites()["1"].fanout, brute_force_fanout(snn.net.get_submodule("2"), (4, 9)))


def test_energy_ratio_from_spike_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    data = [(torch.randn(6, 5), torch.zeros(6, dtype=torch.long))]
    snn = hc.convert(model, data, n=3, T=4, policy="999")
    result = hc.evaluate(snn, data)
    # Brute force: re-run and count spikes of each neuron times its outgoing synapses.
    snn(data[0][0])
    spikes = [s.neuron.spikes for s in snn.sites().values()]
    acs = torch.cumsum(spikes[0] * 4 + spikes[1] * 2, 0) / 6
    macs_ann = 5 * 7 + 7 * 4 + 4 * 2
    expected = (E_MAC * 5 * 7 + E_AC * acs) / (E_MAC * macs_ann)
    assert torch.allclose(torch.tensor(result.energy_ratio, dtype=torch.float64), expected)
    assert torch.allclose(torch.tensor(result.synops_cumulative, dtype=torch.float64), acs)  # the counts themselves
    assert result.macs == {"ann": macs_ann, "static": 5 * 7, "per_step": 0}
    for layer, fanout, spiked in zip(result.per_layer, (4, 2), spikes):  # each site's share
        assert torch.allclose(torch.tensor(layer.synops_cumulative, dtype=torch.float64),
                              torch.cumsum(spiked * fanout, 0) / 6)
    two = result.truncated(2)
    assert two.synops_cumulative == result.synops_cumulative[:2] and two.macs == result.macs
    assert [layer.synops_cumulative for layer in two.per_layer] == \
        [layer.synops_cumulative[:2] for layer in result.per_layer]
    assert json.loads(json.dumps(result.to_dict()))["per_layer"][0]["synops_cumulative"] == \
        result.per_layer[0].synops_cumulative


def test_each_sites_accumulates_are_its_spikes_times_the_synapses_each_drives():
    """Per site, brute force: the levels it emits (k lam is popcount(k) spikes) at each element and
    step, times that element's connections found by perturbing the next layer; the sites add up to
    the total, and a site feeding no layer drives none."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
                          nn.ReLU(), nn.Flatten(), nn.LazyLinear(3), nn.ReLU()).eval()
    model(torch.zeros(1, 1, 7, 7))
    data = [(torch.randn(5, 1, 7, 7), torch.zeros(5, dtype=torch.long))]
    snn = hc.convert(model, data, n=2, T=3, policy="999")
    result = hc.evaluate(snn, data)
    fanouts = {"1": brute_force_fanout(copy.deepcopy(snn.net.get_submodule("2")), (4, 7, 7)),
               "3": torch.full((6, 4, 4), 3.0), "6": torch.zeros(3)}
    levels = {}
    hooks = [site.register_forward_hook(lambda m, a, out, name=name: levels.__setitem__(
        name, (out / m.neuron.lam).round().view(3, 5, *out.shape[1:]))) for name, site in snn.sites().items()]
    with snn.per_step_values():
        snn(data[0][0])
    for h in hooks:
        h.remove()
    popcount = lambda k: sum((k.long() >> bit) & 1 for bit in range(2))  # noqa: E731
    for layer in result.per_layer:
        per_step = (popcount(levels[layer.name]) * fanouts[layer.name]).flatten(1).sum(1).double()
        assert layer.synops_cumulative == (per_step.cumsum(0) / 5).tolist(), layer.name
    total = torch.tensor([layer.synops_cumulative for layer in result.per_layer]).sum(0)
    assert torch.allclose(total.double(), torch.tensor(result.synops_cumulative, dtype=torch.float64))
    assert result.per_layer[-1].synops_cumulative == [0.0] * 3 and result.per_layer[0].synops_cumulative[-1] > 0


class Between(nn.Module):
    """conv -> ReLU -> op -> flatten -> Linear: spikes reach the Linear through the op."""

    def __init__(self, op):
        super().__init__()
        self.op, self.conv, self.fc = op, nn.Conv2d(1, 4, 3, padding=1), nn.LazyLinear(3)
        self.gain = nn.Parameter(torch.tensor([0.5, -2.0, 0.0, 3.0]).view(4, 1, 1))
        self.avg, self.adaptive = nn.AvgPool2d(3, 1, 1), nn.AdaptiveAvgPool2d((2, 3))
        self.avg1d = nn.AvgPool1d(4, 3, 1)

    def forward(self, x):
        return self.fc(self.op(self, torch.relu(self.conv(x))).flatten(1))


def scaled_after_a_read(h):
    before = torch.flatten(h, 1)  # (a layer that read h first would keep what it read)
    h *= 2.0
    return torch.cat((before, torch.flatten(h, 1), torch.flatten(h.sub_(1.0), 1)), 1)


OPS = {  # ops between the neurons and the Linear; overlapping windows on 5 x 5 included
    "scale": lambda m, h: h * 0.5,
    "gain with a zero channel": lambda m, h: h * m.gain,
    "addcmul": lambda m, h: torch.addcmul(m.gain, m.gain, h),
    "divide": lambda m, h: h / 4.0,
    "negate": lambda m, h: torch.sub(-h, 1.0),
    "add with alpha": lambda m, h: torch.add(m.gain, h, alpha=0.5),
    "subtract from": lambda m, h: 1.0 - h,
    "in place": lambda m, h: h.mul_(0.5).sub_(0.1),
    "in place, after a read": lambda m, h: scaled_after_a_read(h),
    "mean": lambda m, h: h.mean((2, 3)),
    "F.adaptive_avg_pool2d": lambda m, h: F.adaptive_avg_pool2d(h, 3),
    "F.avg_pool2d without padding counted": lambda m, h: F.avg_pool2d(h, 3, 2, 1, count_include_pad=False),
    "nn.AvgPool2d": lambda m, h: m.avg(h),
    "nn.AdaptiveAvgPool2d": lambda m, h: m.adaptive(h),
    "nn.AvgPool1d": lambda m, h: m.avg1d(h.flatten(2)),
    "F.avg_pool1d": lambda m, h: F.avg_pool1d(h.flatten(2), 3, 2, 1),
    "F.adaptive_avg_pool1d": lambda m, h: F.adaptive_avg_pool1d(h.flatten(2), 4),
    "F.avg_pool3d": lambda m, h: F.avg_pool3d(h.unsqueeze(1), 2, 1),
    "narrow, select, index_select": lambda m, h: h.narrow(2, 1, 3).select(3, 2).index_select(1, torch.tensor([0, 3])),
    "repeat, tile, detach": lambda m, h: torch.tile(h.repeat(1, 2, 1, 1).detach(), (1, 1, 2)),
}


@pytest.mark.parametrize("name", OPS)
def test_fanout_counts_connections_through_ops(name):
    """Eq. 32 counts synapses, not weights: a spike of ReLU output i costs, per element of the
    op's output that it changes (brute force), the Linear's 3 synapses."""
    torch.manual_seed(0)
    model = Between(OPS[name]).eval()
    model(torch.zeros(1, 1, 5, 5))
    data = [(torch.randn(4, 1, 5, 5), torch.zeros(4, dtype=torch.long))]
    snn = hc.convert(model, data, n=2, T=3, policy="999")
    base = torch.rand(1, 4, 5, 5) + 0.5
    with torch.no_grad():
        ref = model.op(model, base.clone()).flatten()
        expected = torch.zeros(4, 5, 5)
        for i in range(base.numel()):
            h = base.clone()
            h.view(-1)[i] += 1.0
            changed = (model.op(model, h).flatten() - ref).abs() > 1e-9
            expected.view(-1)[i] = changed.sum() * 3
    assert torch.equal(snn.sites()["relu"].fanout, expected)


class ReadThenScaled(nn.Module):
    """A conv reads the ReLU's output, which is then scaled in place (or out of place) for another."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place, self.conv, self.a, self.b = in_place, nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 2, 1), \
            nn.Conv2d(4, 3, 3)

    def forward(self, x):
        r = torch.relu(self.conv(x))
        a = self.a(r)
        if self.in_place:
            r.mul_(2.0)
        else:
            r = r * 2.0
        return self.b(r).sum((2, 3)) + a.flatten(1).sum(1, keepdim=True)


def test_in_place_op_after_a_layer_read_the_tensor():
    data = [(torch.randn(4, 1, 5, 5), torch.zeros(4, dtype=torch.long))]
    snns = [hc.convert(ReadThenScaled(in_place).eval(), data, n=2, T=3, policy="999") for in_place in (True, False)]
    assert torch.equal(snns[0].sites()["relu"].fanout, snns[1].sites()["relu"].fanout)
    assert snns[0].mac_ann == snns[1].mac_ann


@pytest.mark.parametrize("einsum", [False, True])
def test_product_with_a_weight_is_a_synaptic_layer(einsum):
    """``h @ w`` (or its einsum) with a parameter w: each spike reaches a row of w (5 synapses),
    and its MACs are the ANN's."""
    class WeightProduct(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.w, self.fc = nn.Linear(6, 8), nn.Parameter(torch.randn(8, 5)), nn.Linear(5, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = torch.einsum("bi,ij->bj", h, self.w) if einsum else h @ self.w
            return self.fc(torch.relu(h))

    torch.manual_seed(0)
    model = WeightProduct().eval()
    data = [(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))]
    snn = hc.convert(model, data, n=2, T=3, policy="999")
    fanouts = [site.fanout for site in snn.sites().values()]
    assert torch.all(fanouts[0] == 5) and torch.all(fanouts[1] == 3)
    assert snn.mac_ann == 6 * 8 + 8 * 5 + 5 * 3 and snn.mac_static == 6 * 8



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_counts_and_statistics_keep_their_dtype_when_cast(dtype):
    """``.half()`` on a calibrated model or an SNN keeps the float64 statistics and counts (a
    float16 count above 65504 is inf: energy was NaN) and the float32 fan-outs and thresholds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 10)).eval()
    data = [(torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))]
    prepared = hc.calibrate(hc.prepare(model), data)
    snn = hc.convert(prepared, T=2)
    energy = hc.evaluate(snn, data, diagnostics=False).energy_ratio
    counts = ["mac_ann", "mac_static", "mac_step", "memory_profile", "net.1.fanout", "net.1.neuron.lam"]
    kept = {name: snn.get_buffer(name).clone() for name in counts}
    assert snn.mac_ann > 65504  # beyond float16
    snn.to(dtype)
    assert snn.net.get_submodule("0").weight.dtype == dtype
    assert all(torch.equal(snn.get_buffer(name), value) for name, value in kept.items())
    assert hc.evaluate(snn, data, diagnostics=False).energy_ratio == pytest.approx(energy, rel=0.05)
    lam = hc.convert(prepared, T=2).sites()["1"].neuron.lam
    assert hc.convert(prepared.to(dtype), T=2).sites()["1"].neuron.lam.equal(lam)


def test_layer_called_on_the_image_and_on_spikes_counts_each_call_by_its_input():
    """One conv run on the image (analog: MACs once per inference) and on the spikes of its own
    ReLU (accumulates): its first call is static, not a per-step cost."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 2, 1), nn.Linear(2 * 3 * 3, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(torch.relu(self.conv(x)))).flatten(1))

    torch.manual_seed(0)
    data = [(torch.randn(4, 2, 3, 3), torch.zeros(4, dtype=torch.long))]
    snn = hc.convert(Shared().eval(), data, n=2, T=3, policy="999")
    conv_macs = 2 * 2 * 3 * 3  # 1x1 kernel: each of the 2*3*3 outputs reads 2 inputs
    assert snn.mac_static == conv_macs and snn.mac_step == 0
    assert snn.mac_ann == 2 * conv_macs + 2 * 3 * 3 * 3


def test_spikes_scaled_by_the_image_reach_the_next_layer():
    """A factor computed from the image (static) passes spikes on like a constant one: each spike
    still drives the Linear's 3 synapses (the probe's zero image must not cut them)."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4 * 5 * 5, 3)

        def forward(self, x):
            return self.fc((torch.relu(self.conv(x)) * x[:, :1]).flatten(1))

    torch.manual_seed(0)
    data = [(torch.randn(4, 2, 5, 5), torch.zeros(4, dtype=torch.long))]
    snn = hc.convert(Gated().eval(), data, n=2, T=3, policy="999")
    assert torch.all(snn.sites()["relu"].fanout == 3)


def synapse_pairs(layer, shape):
    """(output, weight) pairs each input element feeds, one element at a time through the layer
    with all-ones weights (a reflected or circular copy of an element counts as the element)."""
    ones = copy.deepcopy(layer).double()
    with torch.no_grad():
        ones.weight.fill_(1.0)
        if ones.bias is not None:
            ones.bias.zero_()
        n = math.prod(shape)
        return ones(torch.eye(n, dtype=torch.float64).view(n, *shape)).view(n, -1).sum(1).view(shape)


@pytest.mark.parametrize("layer", [
    nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), padding_mode="replicate", groups=2),
    nn.Conv2d(4, 4, 3, stride=2, padding=2, padding_mode="circular"),
    pytest.param(nn.Conv2d(4, 4, (2, 4), padding="same", dilation=(2, 1)),  # padded unevenly
                 marks=pytest.mark.filterwarnings("ignore:Using padding='same'")),
    nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
    nn.Conv2d(4, 8, 3, padding=1, groups=4),
    nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"),
    nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
    nn.Conv3d(4, 2, (2, 3, 1), stride=(1, 2, 1), padding=(1, 1, 0)),
], ids=repr)
def test_fanout_and_macs_of_padding_modes_and_layer_kinds(layer):
    """The site's fan-out is each element's synapse count in the layer it feeds, and the ANN's MACs
    sum them over every layer (the first conv's and the Linear's included)."""
    torch.manual_seed(0)
    dims = len(layer.kernel_size)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    shape = (2, *(5,) * dims)
    model = nn.Sequential(conv(2, 4, 1), nn.ReLU(), layer, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).eval()
    model(torch.zeros(1, *shape))
    data = [(torch.randn(4, *shape), torch.zeros(4, dtype=torch.long))]
    snn = hc.convert(model, data, n=2, T=2, policy="999")
    pairs = synapse_pairs(layer, (4, *shape[1:]))
    assert torch.equal(snn.sites()["1"].fanout.double(), pairs)
    first = 4 * math.prod(shape[1:]) * 2
    assert snn.mac_ann == first + pairs.sum() + model[5].in_features * 3


def transposed_fanout(in_shape, out_per_group, kernel, stride, padding, dilation, output_padding):
    """Synapses of each input element of a transposed convolution by index arithmetic: input i
    feeds output i*s - p + k*d for each tap k, where that lies inside the output."""
    counts = torch.full(in_shape, float(out_per_group), dtype=torch.float64)
    for d, size in enumerate(in_shape[1:]):
        out = (size - 1) * stride[d] - 2 * padding[d] + dilation[d] * (kernel[d] - 1) + output_padding[d] + 1
        taps = [sum(0 <= i * stride[d] - padding[d] + k * dilation[d] < out for k in range(kernel[d]))
                for i in range(size)]
        counts *= torch.tensor(taps, dtype=torch.float64).view(-1, *[1] * (len(in_shape) - 2 - d))
    return counts


class FunctionalTransposed(nn.Module):
    """conv -> ReLU -> ``F.conv_transpose{1,2,3}d(h, self.weight, ...)`` -> ReLU -> Linear."""

    def __init__(self, dims, stride, padding, output_padding, groups, dilation):
        super().__init__()
        self.conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](2, 4, 1)
        self.weight = nn.Parameter(torch.randn(4, 6 // groups, *(3,) * dims) * 0.3)
        self.bias = nn.Parameter(torch.randn(6) * 0.1)
        self.options = (stride, padding, output_padding, groups, dilation)
        self.function = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        h = self.function(torch.relu(self.conv(x)), self.weight, self.bias, *self.options)
        return self.fc(torch.relu(h).flatten(1))


@pytest.mark.parametrize("dims,stride,padding,output_padding,groups,dilation", [
    (1, 2, 1, 1, 2, 1), (2, 2, 1, 1, 2, 1), (2, (1, 2), (2, 0), (0, 1), 1, (2, 1)), (3, 1, 1, 0, 1, 2)])
def test_functional_transposed_convolutions_convert_and_count_like_their_modules(
        dims, stride, padding, output_padding, groups, dilation):
    torch.manual_seed(0)
    shape = (2, *(4,) * dims)
    model = FunctionalTransposed(dims, stride, padding, output_padding, groups, dilation).eval()
    model(torch.zeros(1, *shape))
    data = [(torch.randn(4, *shape), torch.zeros(4, dtype=torch.long))]
    snn = hc.convert(model, data, n=8, T=32, policy="max")
    x = data[0][0]
    assert torch.allclose(snn.ann_forward(x), model(x), atol=1e-5)
    assert (snn(x).mean(0) - model(x)).abs().max() < 0.05 * model(x).abs().max()
    as_tuple = lambda v: v if isinstance(v, tuple) else (v,) * dims
    fanout = transposed_fanout((4, *shape[1:]), 6 // groups, (3,) * dims, *map(as_tuple, (
        stride, padding, dilation, output_padding)))
    assert torch.equal(snn.sites()["relu"].fanout.double(), fanout)
    first = 4 * math.prod(shape[1:]) * 2
    assert snn.mac_ann == first + fanout.sum() + model.fc.in_features * 3


class PartlyAnalog(nn.Module):
    """A Linear fed spikes plus floats: another layer's output (``"step"``: changes from step to
    step) or the image (``"static"``), with no neuron between."""

    def __init__(self, part):
        super().__init__()
        self.l0, self.l1, self.fc, self.part = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3), part

    def forward(self, x):
        h = torch.relu(self.l0(x))
        return self.fc(h + (self.l1(h) if self.part == "step" else x.repeat(1, 2)[:, :6]))


@pytest.mark.parametrize("part", ["step", "static"])
def test_a_layer_fed_partly_analog_values_counts_macs(part):
    """``fc`` multiplies floats where its input changes over time: 18 MACs at every step and no ACs
    for the spikes of ``h`` in it; an image-derived part is multiplied once, the spikes accumulate."""
    torch.manual_seed(0)
    data = [(torch.randn(6, 5), torch.zeros(6, dtype=torch.long))]
    snn = hc.convert(PartlyAnalog(part).eval(), data, n=3, T=4, policy="999")
    result = hc.evaluate(snn, data)
    snn(data[0][0])  # brute force: this run's spikes times the synapses each one drives
    spikes = snn.sites()["relu"].neuron.spikes
    t = torch.arange(1, 5, dtype=torch.float64)
    macs = {"step": 5 * 6 + t * 6 * 3, "static": 5 * 6 + 6 * 3 + 0 * t}[part]  # (the image's l0: once)
    fanout = {"step": 6, "static": 3}[part]  # l1's synapses only, or fc's
    expected = (E_MAC * macs + E_AC * torch.cumsum(spikes * fanout, 0) / 6) / (E_MAC * snn.mac_ann)
    assert snn.mac_ann == 5 * 6 + 6 * 3 + (6 * 6 if part == "step" else 0)
    assert torch.allclose(torch.tensor(result.energy_ratio, dtype=torch.float64), expected)
    assert result.macs["per_step"] == {"step": 6 * 3, "static": 0}[part]
    assert torch.allclose(torch.tensor(result.synops_cumulative, dtype=torch.float64),
                          torch.cumsum(spikes * fanout, 0) / 6)


def test_a_model_without_layers_has_no_energy_ratio_and_its_result_is_json():
    """No Conv/Linear: the ANN's MACs are 0, so there is no ratio (it was NaN, which JSON cannot hold)."""
    model = nn.Sequential(nn.Flatten(), nn.ReLU()).eval()
    data = [(torch.randn(8, 1, 1, 10, generator=torch.Generator().manual_seed(0)), torch.randint(0, 10, (8,)))]
    result = hc.evaluate(hc.convert(model, data, T=4, policy="max"), data, ann=model)
    assert result.energy_ratio is None and result.macs["ann"] == 0 and len(result.synops_cumulative) == 4
    json.dumps(result.to_dict(), allow_nan=False)
