"""The ViT recipe (identity="all") against an independent implementation (vit_reference.py): the
same thresholds from eq. 29, the same logits at every step, with and without communication."""
import pytest
import torch
import torchvision
from torch import nn

import hmtconv
from reference import optimal_lam
from vit_reference import simulate, site_moments

N, T, HEADS = 4, 8, 2


def vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=HEADS,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5).double().eval()
    nn.init.normal_(model.heads.head.weight, std=0.3)  # torchvision zero-initializes the head
    return model


@pytest.mark.parametrize("communicate", [True, False])
def test_the_vit_snn_equals_an_independent_implementation_of_the_paper(communicate):
    model, g = vit(), torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    x = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    snn = hmtconv.convert(model, [(c, torch.zeros(8, dtype=torch.long)) for c in calib], n=N, T=T, policy="opt",
                          identity="all", communicate=communicate)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        moments = site_moments(sd, HEADS, calib)
    ours = [float(site.neuron.lam) for site in snn.sites().values()]
    assert len(ours) == len(moments) == 18  # the image, the head, and 8 per layer, in the order they run
    assert ours == pytest.approx([optimal_lam(mu, sigma, N, T, signed=True) for mu, sigma in moments.values()], rel=1e-5)
    with torch.no_grad():
        expected = simulate(sd, HEADS, x, dict(zip(moments, ours)), N, T, communicate)
        other = simulate(sd, HEADS, x, dict(zip(moments, ours)), N, T, not communicate)
        steps = snn(x)
    torch.testing.assert_close(steps, expected, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(expected, other)  # (communication changes the logits of this network)
