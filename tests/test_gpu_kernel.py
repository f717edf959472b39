"""The Triton neuron kernel (gpu_kernel.py, triton_neuron.py): equal to the tensor path and the
CPU kernel bit for bit in Triton's interpreter (triton_interpreted.py, in a process of its own);
on a device, its first launch per mode is checked, and a kernel that fails or differs is turned
off with a warning."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hmtconv.neurons import HMTNeuron, gpu_kernel

pytest.importorskip("triton")


def test_triton_kernel_in_the_interpreter():
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          str(here / "triton_interpreted.py")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.fixture
def on_any_device(monkeypatch):
    """The Triton kernel taken for CPU tensors (the CPU kernel off), its per-process state fresh."""
    monkeypatch.setenv("HMTCONV_CPU_KERNEL", "0")
    monkeypatch.setattr(gpu_kernel, "applies", lambda x: not gpu_kernel._off and x.numel() > 0
                        and x.dtype == torch.float32)
    monkeypatch.setattr(gpu_kernel, "_checked", set())
    monkeypatch.setattr(gpu_kernel, "_off", [])


@pytest.mark.parametrize("fault", ["raises", "differs"])
def test_a_triton_kernel_that_fails_or_differs_is_turned_off_with_a_warning(on_any_device, monkeypatch, fault):
    def broken(src, dst, *rest):
        if fault == "raises":
            raise RuntimeError("no kernel image is available for execution on the device")
        dst.copy_(src)  # (not the neuron)

    monkeypatch.setattr(gpu_kernel, "_launch", broken)
    neuron = HMTNeuron(4, 0.3, signed=True)
    x = torch.randn(3, 2, 50)
    with pytest.warns(UserWarning, match="Triton neuron kernel is off"):
        out = neuron(x)
    ref = torch.empty_like(x)
    neuron._forward_tensors(x, ref, neuron.lam.float(), torch.zeros(3, dtype=torch.float64), None)
    assert gpu_kernel._off and torch.equal(out, ref)
    assert gpu_kernel.run(x, torch.empty_like(x), neuron.lam, None, neuron.spike_lut, 15, "signed",
                          torch.zeros(3, dtype=torch.float64), None) is None  # off for the process


def test_a_checked_variant_that_fails_later_is_turned_off_too(on_any_device, monkeypatch):
    """A launch of a variant already checked (say, out of memory or a lost device) also falls back."""
    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_kernel, "_launch", broken)
    neuron, x = HMTNeuron(4, 0.3, signed=True), torch.randn(3, 2, 50)
    gpu_kernel._checked.add((x.device, "signed", neuron.levels, True, True))
    with pytest.warns(UserWarning, match="illegal memory access"):
        out = neuron(x)
    ref = torch.empty_like(x)
    neuron._forward_tensors(x, ref, neuron.lam.float(), torch.zeros(3, dtype=torch.float64), None)
    assert gpu_kernel._off and torch.equal(out, ref)


def test_the_environment_turns_the_kernel_off(monkeypatch):
    """``HMTCONV_GPU_KERNEL=0``: the neurons' tensor path on CUDA (as if Triton were at hand)."""
    monkeypatch.setattr(gpu_kernel, "available", lambda: True)
    monkeypatch.setattr(gpu_kernel, "_off", False)
    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32, numel=lambda: 8)
    assert gpu_kernel.applies(cuda)
    monkeypatch.setenv("HMTCONV_GPU_KERNEL", "0")
    assert not gpu_kernel.applies(cuda)
