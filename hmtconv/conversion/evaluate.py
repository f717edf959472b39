"""``evaluate``: one SNN run of T steps per batch gives the accuracy at every t <= T and the energy.

All counters are tensors that add across batches (and, later, across processes): per-step correct
counts, per-step spikes and synaptic operations, per-site spikes and errors.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .energy import E_AC, E_MAC
from .multistep import step_index, unfold
from .result import EvaluationResult, LayerStats
from .snn import SNN


class _SiteMonitor:
    """Per-site spikes, element counts and |ANN - SNN mean| via forward hooks (cheap: one mean
    over T and one difference per site, no extra layer calls)."""

    def __init__(self, snn: SNN, steps: int, compare: bool):
        self.sites, self.steps, self.compare = snn.sites(), steps, compare
        dev = next(iter(snn.buffers())).device
        k = len(self.sites)
        self.spikes = torch.zeros(k, dtype=torch.float64, device=dev)
        self.elements = torch.zeros(k, dtype=torch.float64, device=dev)
        self.abs_err = torch.zeros(k, dtype=torch.float64, device=dev)
        self.ann: dict[int, torch.Tensor] = {}
        self.hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.sites.values())]

    def _hook(self, i: int):
        def hook(module, args, out):
            if module.ann_mode:
                self.ann[i] = out
                return
            self.spikes[i] += module.neuron.spikes.sum()
            self.elements[i] += out.numel() / self.steps
            if self.compare:
                self.abs_err[i] += (unfold(out, self.steps).mean(0) - self.ann.pop(i)).abs().sum(dtype=torch.float64)
        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()

    def layers(self) -> list[LayerStats]:
        rows = []
        for i, (name, site) in enumerate(self.sites.items()):
            lam = site.neuron.lam.flatten().tolist()
            rows.append(LayerStats(name, site.signed, lam[0] if len(lam) == 1 else lam,
                                   (self.spikes[i] / (self.elements[i] * self.steps)).item(),
                                   (self.abs_err[i] / self.elements[i]).item() if self.compare else None))
        return rows


@torch.no_grad()
def evaluate(snn: SNN, loader: Iterable, *, T: int | None = None, ann: nn.Module | None = None,
             diagnostics: bool = True, max_batches: int | None = None) -> EvaluationResult:
    """Top-1 accuracy at t = 1..T (mean logits of steps 1..t), energy ratio (eqs. 31-32) and,
    with ``diagnostics``, per-site errors against the ANN (one extra ANN-mode pass per batch)."""
    if not isinstance(snn, SNN):
        raise TypeError(f"evaluate expects the SNN returned by hmtconv.convert(), got {type(snn).__name__}")
    steps = snn.config.T if T is None else T
    snn.eval()
    if ann is not None:
        ann.eval()
    device = next(iter(snn.buffers())).device
    correct = torch.zeros(steps, dtype=torch.int64, device=device)
    synops = torch.zeros(steps, dtype=torch.float64, device=device)
    ann_correct = torch.zeros((), dtype=torch.int64, device=device)
    samples = 0
    monitor = _SiteMonitor(snn, steps, compare=diagnostics)
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            if ann is not None:
                ann_correct += (ann(x).argmax(-1) == y).sum()
            if diagnostics:
                snn.ann_forward(x)
            out = snn(x, steps)  # [T, B, classes]
            mean_logits = out.cumsum(0) / step_index(steps, out)
            correct += (mean_logits.argmax(-1) == y).sum(1)
            for site in monitor.sites.values():
                if site.neuron.synops is not None:
                    synops += site.neuron.synops
            samples += y.shape[0]
    finally:
        monitor.close()
    if samples == 0:
        raise ValueError("evaluation loader yielded no batches")
    energy = None
    if snn.mac_ann is not None:
        t = torch.arange(1, steps + 1, dtype=torch.float64, device=device)
        snn_energy = E_MAC * (snn.mac_static + t * snn.mac_step) + E_AC * synops.cumsum(0) / samples
        energy = (snn_energy / (E_MAC * snn.mac_ann)).tolist()
    return EvaluationResult(
        T=steps, samples=samples,
        ann_accuracy=None if ann is None else 100.0 * ann_correct.item() / samples,
        snn_accuracy=(100.0 * correct.to(torch.float64) / samples).tolist(),
        energy_ratio=energy, spikes_per_sample=monitor.spikes.sum().item() / samples,
        per_layer=monitor.layers(), config=snn.config.to_dict(),
        unconverted=list(snn.report.unconverted))
