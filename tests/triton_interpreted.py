"""Checks of the Triton neuron kernel that run it in Triton's interpreter, on CPU tensors.

Not collected by the suite itself: Triton reads TRITON_INTERPRET when it is first imported (torch
imports it), so test_gpu_kernel.py runs this file in a process of its own with it set."""
from __future__ import annotations

import os

import pytest
import torch

from hmtconv.neurons import HMTNeuron, MTNeuron, gpu_kernel
from hmtconv.neurons.kernel_plan import run_planned
from test_cpu_kernel import both_paths, needs_compiler, with_ties
from test_gpu_kernel import on_any_device  # noqa: F401 (a fixture)

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by test_gpu_kernel.py with TRITON_INTERPRET=1", allow_module_level=True)


def triton_run(neuron, x, total=False, forms=0):
    """(out, spikes, synops, sum of outputs over steps or None) from the Triton kernel."""
    out = torch.empty_like(x)
    spikes = torch.zeros(x.shape[0], dtype=torch.float64)
    synops = torch.zeros_like(spikes) if neuron.fanout is not None else None
    sums = torch.empty(x.shape[1:]) if total else None
    assert run_planned(gpu_kernel._launch, x, out, neuron.lam, neuron.fanout, neuron.spike_lut, neuron.levels,
                       neuron.mode, spikes, synops, None, sums, forms)
    return out, spikes, synops, sums


def make_neuron(kind, n, mode, lam):
    signed, communicate = mode != "unsigned", mode == "communicate"
    return HMTNeuron(n, lam, signed=signed, communicate=communicate) if kind == "hmt" else \
        MTNeuron(n, lam * n, signed=signed)


@pytest.mark.parametrize("kind,n", [("hmt", 1), ("hmt", 4), ("hmt", 8), ("mt", 3)])
@pytest.mark.parametrize("mode", ["unsigned", "signed", "communicate"])
@pytest.mark.parametrize("shape,per_channel", [((3, 6, 6), True), ((2, 300), True), ((1, 5), False), ((7,), False)])
def test_triton_kernel_equals_tensor_path(kind, n, mode, shape, per_channel):
    """Outputs, spikes and fan-out-weighted spikes per step and the outputs' sum, bit for bit, over
    5 steps whose first membranes sit on multiples of lam and one ulp off; per-channel thresholds
    (dim 1 of conv activations, the last dim of tokens), a partial block (600 positions)."""
    g = torch.Generator().manual_seed(n)
    channels = shape[0] if len(shape) == 3 else shape[-1]
    lam = (torch.rand(channels, generator=g) * 0.5 + 0.05) if per_channel else torch.tensor(0.37)
    if per_channel and len(shape) == 3:
        lam = lam.view(-1, 1, 1)
    neuron = make_neuron(kind, n, mode, lam)
    neuron.fanout = torch.randint(0, 9, shape[1:] if len(shape) > 1 else shape, generator=g).to(torch.float32)
    x = with_ties((5, 2, *shape) if len(shape) > 1 else (5, *shape), lam.flatten()[0].item(), neuron.levels, g)
    out, spikes, synops, sums = triton_run(neuron, x, total=True)
    ref_out, ref_spikes, ref_synops = both_paths(neuron, x)[1]
    assert torch.equal(out, ref_out) and torch.equal(spikes, ref_spikes) and torch.equal(synops, ref_synops)
    total = torch.zeros_like(sums)
    for step in ref_out:  # the kernels' order of additions: from 0, step by step
        total += step
    assert torch.equal(sums, total) and spikes.sum() > 0


@needs_compiler
@pytest.mark.parametrize("mode", ["unsigned", "signed", "communicate"])
def test_triton_kernel_equals_cpu_kernel_on_head_views_and_infinities(mode):
    """A transposed (attention heads) view runs in memory order with its per-channel thresholds and
    fan-outs permuted alike; infinite and NaN membranes behave as in the CPU kernel (saturate; stay
    NaN, no spikes)."""
    from hmtconv.neurons import cpu_kernel

    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 3, 10, 2, 8, generator=g)
    base[1, 0, 0, 0, 0], base[2, 1, 2, 1, 1], base[0, 2, 3, 0, 5] = float("inf"), float("-inf"), float("nan")
    x = base.transpose(-2, -3)
    neuron = make_neuron("hmt", 4, mode, torch.rand(8, generator=g) + 0.1)
    neuron.fanout = torch.randint(0, 5, x.shape[2:], generator=g).to(torch.float32)
    out, spikes, synops, _ = triton_run(neuron, x)
    ref_out = torch.empty_like(x)
    ref_spikes, ref_synops = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    assert cpu_kernel.run(x, ref_out, neuron.lam, neuron.fanout, neuron.spike_lut, neuron.levels, neuron.mode,
                          ref_spikes, ref_synops)
    assert torch.equal(out.nan_to_num(7.0), ref_out.nan_to_num(7.0)) and out.isnan().any()
    assert torch.equal(spikes, ref_spikes) and torch.equal(synops, ref_synops)


def tiny_vit_snn(communicate: bool):
    from torchvision.models import VisionTransformer

    import hmtconv

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                            num_classes=3).eval()
    torch.nn.init.normal_(vit.heads.head.weight)
    calib = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))]
    return hmtconv.convert(vit, calib, n=4, T=4, identity="all", communicate=communicate)


@pytest.mark.parametrize("communicate", [True, False])
def test_an_snn_on_the_triton_kernel_equals_its_tensor_path(on_any_device, monkeypatch, communicate):
    """A ViT SNN (signed sites, head views, fan-outs): the first launch of each mode is checked
    against the tensor path, later ones run alone; the outputs equal the tensor path's."""
    snn, x = tiny_vit_snn(communicate), torch.randn(2, 3, 8, 8)
    launches = []
    real = gpu_kernel._launch
    monkeypatch.setattr(gpu_kernel, "_launch", lambda *a: launches.append(a[-3]) or real(*a))
    y = snn(x)
    assert {key[:3] for key in gpu_kernel._checked} == {(x.device, "communicate" if communicate else "signed", 15)}
    assert not gpu_kernel._off
    assert len(launches) == len(snn.sites())
    monkeypatch.setattr(gpu_kernel, "applies", lambda x: False)
    assert torch.equal(y, snn(x))


@pytest.mark.parametrize("mode", ["unsigned", "signed", "communicate"])
@pytest.mark.parametrize("forms", [1, 2, 3])
def test_triton_kernel_on_running_means_equals_tensor_path(mode, forms):
    """Running means in (``takes_means``), out (``gives_means``) or both, as the tensor path
    computes them, bit for bit (test_running_means.py checks that path against the definitions)."""
    g = torch.Generator().manual_seed(forms)
    neuron = make_neuron("hmt", 4, mode, torch.rand(6, generator=g) * 0.4 + 0.1)
    neuron.fanout = torch.randint(0, 9, (5, 6), generator=g).to(torch.float32)
    neuron.takes_means, neuron.gives_means = bool(forms & 1), bool(forms & 2)
    x = with_ties((7, 2, 5, 6), 0.3, neuron.levels, g)
    out, spikes, synops, sums = triton_run(neuron, x, total=True, forms=forms)
    ref, ref_sums = torch.empty_like(x), torch.empty_like(sums)
    ref_spikes, ref_synops = torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    neuron._forward_tensors(x, ref, neuron.lam, ref_spikes, ref_synops, ref_sums)
    assert torch.equal(out, ref) and torch.equal(spikes, ref_spikes) and torch.equal(synops, ref_synops)
    assert torch.equal(sums, ref_sums) and spikes.sum() > 0
