"""torchvision's ResNet18 (max pooling, residual adds, BatchNorm, a ReLU module called twice per
block) against an independent implementation (resnet_reference.py): the same thresholds from
eq. 29, the same logits at every step and the same number of spikes."""
import pytest
import torch
import torchvision

import hmtconv
from reference import optimal_lam
from resnet_reference import simulate, site_moments

N, T = 4, 6


def test_resnet18_snn_equals_an_independent_implementation_of_the_paper():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).double().eval()
    g = torch.Generator().manual_seed(1)
    for module in model.modules():  # BatchNorm statistics of a trained model, not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=g)
            module.running_var.uniform_(0.5, 2.0, generator=g)
            module.bias.data.normal_(0, 0.2, generator=g)
    calib = [torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2)]
    x = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    batches = [(c, torch.zeros(6, dtype=torch.long)) for c in calib]
    snn = hmtconv.convert(model, batches, n=N, T=T, policy="opt")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        moments = site_moments(sd, calib)
    ours = [float(site.neuron.lam) for site in snn.sites().values()]
    assert len(ours) == len(moments) == 17  # the stem, and two calls of each block's ReLU, in the order they run
    assert ours == pytest.approx([optimal_lam(mu, sigma, N, T, signed=False) for mu, sigma in moments.values()], rel=1e-5)
    with torch.no_grad():
        expected, spikes = simulate(sd, x, dict(zip(moments, ours)), N, T)
        torch.testing.assert_close(snn(x), expected, rtol=1e-9, atol=1e-9)
    result = hmtconv.evaluate(snn, [(x, torch.zeros(3, dtype=torch.long))])
    assert result.spikes_per_sample == pytest.approx(spikes / 3, rel=1e-12)
