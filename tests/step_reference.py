"""A converted SNN run literally, one time step at a time (test oracle for the time-folded fast path).

The fast SNN runs all T steps at once on ``[T*B, ...]``. This reference runs a copy of its
network T times on the batch ``[B, ...]`` alone, with its time-aware modules swapped for
stateful one-step ones:

- a spiking site keeps its own membranes and fires by :func:`reference.basal_fire` (eqs. 13-18),
  Pos and Neg halves for a signed site, exchanging outputs after each step when it communicates
  (eq. 21);
- a compensated op keeps the running sums of its inputs and its previous F output and emits
  ``t*F(mean of inputs 1..t) - (t-1)*F(mean of inputs 1..t-1)`` (the ViT recipe's expectation
  compensation);
- a static activation repeated over the steps (``ToTime``) passes through: every step sees the image.

Everything else runs as the network's plain float module, so no step, sample or batch size
is folded anywhere. A module called several times per step keeps one state per call.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from hmtconv.conversion.compensated import Compensated
from hmtconv.conversion.multistep import ToTime
from hmtconv.conversion.sites import SpikingActivation
from hmtconv.neurons import HMTNeuron
from reference import basal_fire


class _PerCall(nn.Module):
    """State kept per call of the module within a step (``states[i]`` for its i-th call)."""

    def __init__(self):
        super().__init__()
        self.states: list[dict] = []
        self.calls = 0

    def state(self) -> dict:
        if self.calls == len(self.states):
            self.states.append({})
        self.calls += 1
        return self.states[self.calls - 1]


class StepSite(_PerCall):
    """One step of a spiking site's H-MT neuron (signed: Pos gets I, Neg gets -I, output outP - outN)."""

    def __init__(self, site: SpikingActivation):
        super().__init__()
        neuron = site.neuron
        if not isinstance(neuron, HMTNeuron):
            raise TypeError(f"the step reference simulates H-MT neurons, got {type(neuron).__name__}")
        self.lam, self.n = neuron.lam.detach().clone(), neuron.n
        self.signed, self.communicate = neuron.signed, neuron.communicate
        self.spikes: list[list[torch.Tensor]] = []  # per call, spikes per step summed over all elements
        self.elements: list[int] = []  # per call, elements of one step's input per sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.state()
        lam = self.lam.to(x.dtype)  # the neuron casts its threshold to the input's dtype
        if not s:
            s["pos"] = (lam / 2).expand(x.shape).clone()  # eq. 13
            s["neg"] = s["pos"].clone()
            s["spikes"] = []
            self.spikes.append(s["spikes"])
            self.elements.append(x[0].numel())
        out_pos, s["pos"], spikes = basal_fire(s["pos"], x, lam, self.n)
        if not self.signed:
            s["spikes"].append(spikes.sum(dtype=torch.float64))
            return out_pos
        out_neg, s["neg"], spikes_neg = basal_fire(s["neg"], -x, lam, self.n)
        if self.communicate:  # eq. 21
            s["pos"], s["neg"] = s["pos"] + out_neg, s["neg"] + out_pos
        s["spikes"].append((spikes + spikes_neg).sum(dtype=torch.float64))
        return out_pos - out_neg


class StepCompensated(_PerCall):
    """One step of expectation compensation around the plain float op. Arguments the conversion
    marked constant over time pass through; the reference checks that they are."""

    def __init__(self, wrapper: Compensated):
        super().__init__()
        self.module, self.temporal = wrapper.module, wrapper.temporal

    def forward(self, *args, **kwargs):
        s = self.state()
        flags = self.temporal or tuple(isinstance(a, torch.Tensor) for a in args)
        t = s["t"] = s.get("t", 0) + 1
        if t == 1:
            s["sums"] = [a.clone() if f else a for a, f in zip(args, flags)]
        else:
            for i, (a, f) in enumerate(zip(args, flags)):
                if f:
                    s["sums"][i] = s["sums"][i] + a
                elif isinstance(a, torch.Tensor) and not torch.equal(a, s["sums"][i]):
                    raise AssertionError(f"{type(self.module).__name__}: argument {i} is marked constant over time "
                                         f"but changed at step {t}")
        means = [total / t if f else total for total, f in zip(s["sums"], flags)]
        y = self.module(*means, **kwargs)
        out = y * t if t == 1 else y * t - s["previous"] * (t - 1)
        s["previous"] = y
        return out


class StepToTime(nn.Module):
    """A static activation at one step: itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _swap(net: nn.Module) -> dict[str, StepSite]:
    sites = {}
    for name, module in list(net.named_modules()):
        if isinstance(module, SpikingActivation):
            sites[name] = StepSite(module)
            net.set_submodule(name, sites[name])
        elif isinstance(module, Compensated):
            net.set_submodule(name, StepCompensated(module))
        elif isinstance(module, ToTime):
            net.set_submodule(name, StepToTime())
    return sites


@torch.no_grad()
def run_steps(snn, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, list[int]]]:
    """``(outputs [T, B, ...], spikes per site [calls, T], elements per site, call and sample)`` of
    ``snn`` on ``x`` ``[B, ...]``, simulated one step at a time on a copy of its network."""
    net = copy.deepcopy(snn.net)
    sites = _swap(net)
    stateful = [m for m in net.modules() if isinstance(m, _PerCall)]
    outs = []
    for _ in range(steps):
        for m in stateful:
            m.calls = 0
        outs.append(net(x))
    called = {name: site for name, site in sites.items() if site.spikes}
    spikes = {name: torch.stack([torch.stack(c) for c in site.spikes]) for name, site in called.items()}
    return torch.stack(outs), spikes, {name: site.elements for name, site in called.items()}
