"""``evaluate``: one SNN run of T steps per batch gives the accuracy at every t <= T and the energy.

Every batch yields one row of counts that add up: per-step correct counts, per-site per-step
spikes and synaptic operations, per-site elements and errors, the ANN's correct count and the
batch size.
Under torchrun each rank evaluates its own whole batches and the rows of all ranks are summed in
the single-process batch order, so every number equals a single-process run's bit for bit.
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..allocator import gc_paused
from ..device import placement
from . import huggingface, memory
from .api import is_prepared
from .batches import batch_labels, first_batches, model_input
from .energy import E_AC, E_MAC
from .memory import chunk_size, cpu_chunk, format_bytes, parse_bytes
from .multistep import step_index
from .policies import depends_on_T
from .result import EvaluationResult, LayerStats
from .snn import SNN, check_steps


class _SiteMonitor:
    """Per-site per-step spikes and synaptic operations, element counts and |ANN - SNN mean| of
    the current batch via forward hooks (cheap: the neurons sum their outputs
    over T as they run, so a comparison costs one difference per site at batch size, no extra
    layer calls or passes over T; the counts are kept as the neurons give them and added up
    once a batch). Hooks add up, so a batch may run as several chunks."""

    def __init__(self, snn: SNN, steps: int, compare: bool):
        self.sites, self.steps, self.compare = snn.sites(), steps, compare
        for site in self.sites.values():
            site.neuron.sum_outputs = compare
        self.device = placement(snn)[0]
        self.errors = torch.zeros(len(self.sites), dtype=torch.float64, device=self.device)  # |err| per site
        self.runs: list[tuple[int, torch.Tensor, torch.Tensor | None, float]] = []  # site, spikes, synops, elements
        self.ann: dict[int, list[torch.Tensor]] = {}  # per site, its ANN-mode outputs in call order
        self.run_order: dict[int, None] = {}  # the sites as first run (a module-swapped model's modules
        # are in the order its __init__ made them)
        self.hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.sites.values())]

    def _hook(self, i: int):
        def hook(module, args, out):
            if module.ann_mode:  # (a module-swapped site may be called more than once per forward)
                self.ann.setdefault(i, []).append(out.clone() if module.output_mutated else out)
                return
            self.runs.append((i, module.neuron.spikes, module.neuron.synops, out.numel() / self.steps))
            self.run_order.setdefault(i)
            if self.compare:
                mean = module.neuron.output_sum / self.steps
                self.errors[i] += (mean - self.ann[i].pop(0)).abs().sum(dtype=torch.float64)
                module.neuron.output_sum = None
        return hook

    def take(self) -> torch.Tensor:
        """This batch's per-site per-step spikes and synops, then per-site elements and |err|,
        flattened; starts the next batch at 0. (Counts are integers: float64 sums of them are
        exact in any order.)"""
        f64 = dict(dtype=torch.float64, device=self.device)
        site_steps = torch.zeros(2, len(self.sites), self.steps, **f64)  # spikes, synops
        elements = torch.zeros(len(self.sites), **f64)
        if self.runs:
            index = torch.tensor([run[0] for run in self.runs], device=self.device)
            site_steps[0].index_add_(0, index, torch.stack([run[1] for run in self.runs]).to(torch.float64))
            counted = [i for i, run in enumerate(self.runs) if run[2] is not None]
            if counted:
                synops = torch.stack([self.runs[i][2] for i in counted]).to(torch.float64)
                site_steps[1].index_add_(0, index[counted], synops)
            elements.index_add_(0, index, torch.tensor([run[3] for run in self.runs], **f64))
        row = torch.cat([site_steps.flatten(), elements, self.errors])
        self.runs, self.errors = [], torch.zeros_like(self.errors)
        return row

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        for site in self.sites.values():
            site.neuron.sum_outputs, site.neuron.output_sum = False, None

    def layers(self, site_steps: torch.Tensor, elements: torch.Tensor, abs_err: torch.Tensor, samples: int,
               energy: bool) -> list[LayerStats]:
        """Per site, in run order (sites never run last); synops per sample where ``energy`` was counted."""
        rows, names = [], list(self.sites)
        spikes, synops = site_steps.view(2, len(names), self.steps).cumsum(2)
        rates = spikes / (elements[:, None] * torch.arange(1, self.steps + 1, dtype=torch.float64,
                                                           device=elements.device))
        for i in [*self.run_order, *(i for i in range(len(names)) if i not in self.run_order)]:
            name, site = names[i], self.sites[names[i]]
            lam = site.neuron.lam.flatten().tolist()
            rows.append(LayerStats(name, site.signed, lam[0] if len(lam) == 1 else lam, rates[i, -1].item(),
                                   (abs_err[i] / elements[i]).item() if self.compare else None, rates[i].tolist(),
                                   (synops[i] / samples).tolist() if energy else None))
        return rows


def _first_nonfinite_site(snn: SNN, x: torch.Tensor, steps: int, chunk: int | None) -> str:
    """Re-run a batch whose outputs were not finite, in the same chunks, and name the first site
    (in run order, over all chunks) whose input was not. The evaluation's monitor must be closed
    first: its hooks would count this run and look for ANN-mode outputs it does not have."""
    sites = snn.sites()
    found: set[str] = set()

    def record(name: str):
        def hook(module, args):  # before the site runs: its neuron may write its output over its input
            if name not in found and not torch.isfinite(args[0]).all():
                found.add(name)
        return hook

    hooks = [site.register_forward_pre_hook(record(name)) for name, site in sites.items()]
    try:
        for part in (x.split(chunk) if chunk else (x,)):
            snn(part, steps)
    finally:
        for h in hooks:
            h.remove()
    first = next((name for name in sites if name in found), None)
    return f"the input of site {first}" if first else "the layers after the last spiking site"


def _chunk_limit(snn: SNN, steps: int, max_batch: int | None, memory_budget: int | str | None,
                 device: torch.device) -> int | None:
    if max_batch is not None and memory_budget is not None:
        raise ValueError("give max_batch or memory_budget, not both")
    if max_batch is not None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        return max_batch
    if memory_budget is None:
        return _cpu_default(snn, steps) if device.type == "cpu" else None
    if isinstance(memory_budget, str):
        budget = parse_bytes(memory_budget)
    elif isinstance(memory_budget, numbers.Real) and not isinstance(memory_budget, bool) \
            and math.isfinite(memory_budget) and memory_budget >= 1:
        budget = int(memory_budget)
    else:
        raise ValueError(f"memory_budget must be a number of bytes (at least 1) or a size such as '4GB', "
                         f"got {memory_budget!r}")
    per_sample = snn.activation_bytes(steps)
    if per_sample > budget:
        warnings.warn(f"one sample at T={steps} needs about {format_bytes(per_sample)} of activations, more than "
                      f"the budget of {format_bytes(budget)}; simulating one sample at a time", stacklevel=3)
    return chunk_size(per_sample, budget, batch=2**62)


def _cpu_default(snn: SNN, steps: int) -> int:
    """cpu_chunk, fewer where half the memory available would not hold them (a long T): one sample
    that does not fit at all is an error, not the out-of-memory killer's silent end. (Traced SNNs
    only: a module-swapped model's estimate adds up every layer's output, far above its peak.)"""
    free = memory.available_memory()
    if free is None or snn.memory_profile is None:
        return cpu_chunk(steps)
    per_sample = snn.activation_bytes(steps)
    if per_sample > free:
        raise ValueError(f"one sample at T={steps} needs about {format_bytes(per_sample)} of activations, more than "
                         f"the {format_bytes(free)} of memory available; simulate fewer steps")
    return min(cpu_chunk(steps), chunk_size(per_sample, free // 2, batch=2**62))


def _simulate(snn: SNN, x: torch.Tensor, steps: int, chunk: int | None, diagnostics: bool,
              seconds: dict[str, float], device: torch.device) -> torch.Tensor:
    """``snn(x, steps)``, in chunks of at most ``chunk`` samples; the ANN-mode pass of the
    diagnostics runs on the same chunk just before (the site hooks pair them up). Adds the
    wall-clock time of each to ``seconds["diagnostics"]`` and ``seconds["snn"]``."""
    outs = []
    with gc_paused():
        for part in (x.split(chunk) if chunk else (x,)):
            if diagnostics:
                started = _clock(device)
                snn.ann_forward(part)
                seconds["diagnostics"] += _clock(device) - started
            started = _clock(device)
            outs.append(snn(part, steps))
            seconds["snn"] += _clock(device) - started
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _logits(output, who: str, batch: int) -> torch.Tensor:
    """The logits in ``output`` (a Hugging Face model's ``.logits``) if they are ``[B, classes]``;
    accuracy (argmax over the last dim) needs them so."""
    logits = huggingface.logits(output)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"evaluation batch {batch}: {who} returns a {type(logits).__name__}, not logits [B, classes]; "
                         f"evaluate a model that returns them alone")
    if logits.dim() != 2:
        raise ValueError(f"evaluation batch {batch}: {who} returns outputs of shape {list(logits.shape)}, not "
                         f"logits [B, classes]; evaluate a model that returns them (e.g. ending in nn.Flatten())")
    return logits


def _check_labels(y: torch.Tensor, classes: int, batch: int) -> None:
    bad = (y < 0) | (y >= classes)
    if bad.any():
        raise ValueError(f"evaluation batch {batch}: label {y[bad][0].item()} is outside 0..{classes - 1} (the model "
                         f"has {classes} outputs); does the dataset match the model?")


def _sum_batches(rows: list[torch.Tensor], width: int, device: torch.device) -> torch.Tensor:
    """Column sums of every rank's rows, added one batch at a time in the single-process batch
    order (ranks hold contiguous runs of whole batches), so float sums round identically."""
    local = torch.stack(rows).cpu() if rows else torch.zeros(0, width, dtype=torch.float64)
    total = torch.zeros(width, dtype=torch.float64)
    for row in torch.cat(distributed.all_gather_objects(local)):
        total += row
    return total.to(device)


@torch.no_grad()
def evaluate(snn: SNN, loader: Iterable, *, T: int | None = None, ann: nn.Module | None = None,
             diagnostics: bool = True, max_batches: int | None = None, progress: bool = False,
             max_batch: int | None = None, memory_budget: int | str | None = None) -> EvaluationResult:
    """Top-1 accuracy at t = 1..T (mean logits of steps 1..t), energy ratio (eqs. 31-32) and,
    with ``diagnostics``, per-site errors against the ANN (one extra ANN-mode pass per batch).
    ``progress`` shows a bar over batches (on rank 0 only); under torchrun ``max_batches`` counts
    each rank's batches.

    Memory: each batch is simulated in chunks of at most ``max_batch`` samples, or of as many as
    fit ``memory_budget`` (bytes or ``"4GB"``; estimated activation memory, see memory.py); with
    neither, on CPU, in chunks of ``memory.cpu_chunk(T)`` samples (32-64: faster than whole
    batches that outgrow the cache). Samples are independent, so accuracies, spikes and energy do
    not depend on the chunking (the per-site errors only to float rounding: an ANN-mode layer may
    round differently at another batch size).

    ``T`` defaults to the T of ``convert``; another T runs that many steps with the thresholds
    convert chose, which for opt, opt1500 and opt-emp were chosen for its T (a warning says so)."""
    if not isinstance(snn, SNN):
        raise TypeError(f"evaluate expects the SNN returned by hmtconv.convert(), got {type(snn).__name__}")
    if ann is not None and (isinstance(ann, SNN) or is_prepared(ann)):
        raise TypeError(f"ann= expects the float model the SNN was converted from, got a "
                        f"{'converted' if isinstance(ann, SNN) else 'prepared'} {type(ann).__name__} (a prepared "
                        f"model's observers would add the evaluation images to its calibration)")
    steps = snn.config.T if T is None else check_steps(T)
    if steps != snn.config.T and depends_on_T(snn.config.policy):
        warnings.warn(f"evaluating at T={steps} an SNN whose thresholds (policy {snn.config.policy!r}) were chosen "
                      f"for T={snn.config.T}; convert with T={steps} for its own", stacklevel=2)
    snn.eval()
    # each module's own mode, restored after (a model being fine-tuned may keep some, as a frozen
    # BatchNorm, in eval mode: ann.train() would not restore those)
    ann_modes = {} if ann is None else {module: module.training for module in ann.modules()}
    if any(ann_modes.values()):
        warnings.warn(f"the ANN {type(ann).__name__} is{'' if ann.training else ' partly'} in training mode; "
                      f"evaluating it in eval mode (restored after)", stacklevel=3)
        ann.eval()
    device, dtype = placement(snn)
    # the ANN may live on another device or dtype: it gets the batch's images moved to its own
    ann_placement = None if ann is None else placement(ann)
    shape = tuple(snn.report.input_shape)
    chunk = _chunk_limit(snn, steps, max_batch, memory_budget, device)
    monitor = _SiteMonitor(snn, steps, compare=diagnostics)
    sites = len(monitor.sites)
    rows, seconds = [], {"ann": 0.0, "snn": 0.0, "diagnostics": 0.0}
    try:
        # disable=None: a bar on terminals only, so logs and captured stderr stay clean
        bar = tqdm(first_batches(loader, max_batches, "evaluate"), desc=f"evaluate T={steps}", unit="batch",
                   leave=False, disable=True if not progress or not distributed.is_main() else None)
        for i, batch in enumerate(bar):
            x = model_input(batch, device, dtype, f"evaluation batch {i}")
            y = batch_labels(batch, x, f"evaluation batch {i}").to(device)
            if tuple(x.shape[1:]) != shape:
                raise ValueError(f"evaluation batch {i} has images of shape {list(x.shape[1:])} but the SNN was "
                                 f"calibrated on {list(shape)}; use the same image size and channels")
            started = _clock(device)
            ann_logits = None if ann is None else \
                _logits(ann(batch[0].to(*ann_placement)), f"the ANN {type(ann).__name__}", i)
            ann_pred = None if ann is None else ann_logits.argmax(-1).to(device)
            seconds["ann"] += _clock(device) - started
            out = _simulate(snn, x, steps, chunk, diagnostics, seconds, device)  # [T, B, classes]
            _logits(out[0], "the SNN", i)
            if ann_logits is not None and ann_logits.shape != out.shape[1:]:
                raise ValueError(f"evaluation batch {i}: the ANN {type(ann).__name__} gives logits of shape "
                                 f"{list(ann_logits.shape)}, the SNN {list(out.shape[1:])}; pass as ann= the model "
                                 f"the SNN was converted from")
            counts = torch.tensor([0.0, y.shape[0]], dtype=torch.float64, device=device)
            if ann_pred is not None:
                counts[0] = (ann_pred == y).sum()
            if not torch.isfinite(out).all():
                monitor.close()
                raise ValueError(f"evaluation batch {i}: NaN or inf in the SNN, first at "
                                 f"{_first_nonfinite_site(snn, x, steps, chunk)} (finite input images)")
            _check_labels(y, out.shape[-1], i)
            # running means of the logits in at least float32: a half or bfloat16 sum rounds them
            precise = out.to(torch.promote_types(out.dtype, torch.float32))
            mean_logits = precise.cumsum(0) / step_index(steps, precise)
            pred = mean_logits.argmax(-1)
            correct = (pred == y).sum(1)
            agree = (pred == ann_pred).sum(1) if ann_pred is not None else torch.zeros_like(correct)
            rows.append(torch.cat([correct.to(torch.float64), agree.to(torch.float64), monitor.take(), counts]))
    finally:
        monitor.close()
        for module, training in ann_modes.items():
            module.training = training
    total = _sum_batches(rows, 2 * steps + 2 * sites * steps + 2 * sites + 2, device)
    correct, agree, site_steps, elements, abs_err, (ann_correct, samples) = \
        total.split([steps] * 2 + [2 * sites * steps] + [sites] * 2 + [2])
    step_spikes, synops = site_steps.view(2, sites, steps).sum(1)
    samples = int(samples.item())
    if samples == 0:
        raise ValueError("evaluation loader yielded no batches (is the evaluation set empty?)")
    energy = synops_cumulative = macs = None
    if snn.mac_ann is not None:
        t = torch.arange(1, steps + 1, dtype=torch.float64, device=device)
        snn_energy = E_MAC * (snn.mac_static + t * snn.mac_step) + E_AC * synops.cumsum(0) / samples
        energy = (snn_energy / (E_MAC * snn.mac_ann)).tolist() if snn.mac_ann > 0 else None  # (no layer: no ratio)
        synops_cumulative = (synops.cumsum(0) / samples).tolist()
        macs = {"ann": float(snn.mac_ann), "static": float(snn.mac_static), "per_step": float(snn.mac_step)}
    return EvaluationResult(
        T=steps, samples=samples,
        ann_accuracy=None if ann is None else 100.0 * ann_correct.item() / samples,
        snn_accuracy=(100.0 * correct / samples).tolist(),
        agreement=None if ann is None else (100.0 * agree / samples).tolist(),
        energy_ratio=energy, spikes_per_sample=step_spikes.sum().item() / samples,
        spikes_cumulative=(step_spikes.cumsum(0) / samples).tolist(), synops_cumulative=synops_cumulative, macs=macs,
        per_layer=monitor.layers(site_steps, elements, abs_err, samples, snn.mac_ann is not None), config=snn.config.to_dict(),
        unconverted=list(snn.report.unconverted), seconds=seconds)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":  # kernels run asynchronously: wait for them to be timed
        torch.cuda.synchronize(device)
    return time.perf_counter()
