"""Energy counts (eqs. 31-32) against brute force on tiny networks."""
import pytest
import torch
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
