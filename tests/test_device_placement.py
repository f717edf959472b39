"""Tensors made where their inputs live. No GPU runs the tests: the meta device stands in for
CUDA (a tensor made on the CPU mid-computation meets a meta tensor as it would a CUDA one)."""
import torch
from torch import nn

import hmtconv as hc
from hmtconv.conversion import energy
from hmtconv.theory.error import broadcast64

META = torch.device("meta")


def test_prepare_puts_the_observers_on_the_models_device():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval().to(META)
    prepared = hc.prepare(model, identity="all")
    assert {b.device for b in prepared.buffers()} == {META}


def test_adaptive_pool_windows_are_counted_on_the_activations_device():
    out, x = torch.empty(1, 2, 3, 3, device=META), torch.empty(1, 2, 7, 7, device=META)
    assert energy._adaptive_sum(out, x, 2).device == META


def test_theory_broadcasts_numbers_to_the_tensors_device():
    mu = torch.zeros(5, device=META)
    assert all(t.device == META for t in broadcast64(mu, 1.0, 4, torch.tensor(3.0)))
    assert all(t.device.type == "cpu" for t in broadcast64(1.0, 4))
