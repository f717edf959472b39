"""The neuron's kernel for CUDA tensors (``triton_neuron.py``): all T steps in one launch where
the tensor path launches about twenty kernels per step.

No GPU was at hand where this was written: the kernel is tested in Triton's interpreter (CPU
tensors) against the tensor path bit for bit, and on a GPU the first launch of each variant on
each device is checked against the tensor path on the same input. A kernel that cannot be built there, or that
differs, is turned off for the process with a warning, and the tensor path runs, as it does
without Triton or with ``HMTCONV_GPU_KERNEL=0``.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Callable

import torch

from .kernel_plan import Plan, run_planned

MODES = {"unsigned": 0, "signed": 1, "communicate": 2}
BLOCK = 256
_checked: set[tuple] = set()  # kernel variants (see run) whose first launch equalled the tensor path
_off: list[str] = []  # why the kernel was turned off, if it was


@functools.cache
def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def applies(x: torch.Tensor) -> bool:
    """On, Triton importable, and ``x`` a non-empty float32 CUDA tensor."""
    return (os.environ.get("HMTCONV_GPU_KERNEL", "1") != "0" and not _off and x.device.type == "cuda"
            and x.dtype == torch.float32 and x.numel() > 0 and available())


def _launch(src, dst, sums, steps, batch, per_sample, current: Plan, levels, mode, forms, spikes, synops) -> None:
    from . import triton_neuron  # (imports triton: only once a kernel is wanted)

    n = batch * per_sample
    counts = torch.zeros(2, steps, dtype=torch.int64, device=src.device)
    fanout = current.fanout if current.fanout is not None else current.lut  # (a pointer it does not read)
    triton_neuron.neuron_steps[(-(-n // BLOCK),)](
        src, dst, dst if sums is None else sums, current.lam, fanout, current.lut, counts, steps, n, per_sample,
        LEVELS=levels, MODE=MODES[mode], FORMS=forms, HAS_FANOUT=current.fanout is not None,
        HAS_SUM=sums is not None, BLOCK=BLOCK, enable_fp_fusion=False)
    spikes.add_(counts[0])
    if synops is not None:
        synops.add_(counts[1])


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None or bool(((a == b) | (a.isnan() & b.isnan())).all())


def run(x: torch.Tensor, out: torch.Tensor, lam: torch.Tensor, fanout: torch.Tensor | None,
        spike_lut: torch.Tensor, levels: int, mode: str, spikes: torch.Tensor, synops: torch.Tensor | None,
        previous: Plan | None = None, total: torch.Tensor | None = None, forms: int = 0,
        tensor_path: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], None]
        | None = None) -> Plan | None:
    """As :func:`hmtconv.neurons.cpu_kernel.run`, for CUDA tensors. ``tensor_path(out, spikes,
    synops, total)`` computes the same with the tensor path; the first launch of each variant of
    the kernel (mode, levels, forms, fan-outs or not, sums or not: each compiles apart) on each device runs
    both (on finite inputs) and keeps the tensor path's results."""
    if not applies(x):
        return None
    key = (x.device, mode, levels, forms, fanout is None, total is None)
    checking = key not in _checked and tensor_path is not None
    if checking and not bool(torch.isfinite(x).all()):
        return None  # (the tensor path's floor division makes NaN of an infinite membrane)
    trial = (torch.empty_like(out), torch.zeros_like(spikes), None if synops is None else torch.zeros_like(synops),
             None if total is None else torch.empty_like(total)) if checking else (out, spikes, synops, total)
    try:
        current = run_planned(_launch, x, trial[0], lam, fanout, spike_lut, levels, mode, *trial[1:3], previous,
                              trial[3], forms)
    except Exception as error:  # noqa: BLE001 (Triton's compile and launch errors have no common type)
        return _turn_off(f"it failed on {x.device}: {type(error).__name__}: {error}")
    if current is None or not checking:
        return current
    tensor_path(out, spikes, synops, total)
    if all(_equal(a, b) for a, b in zip(trial, (out, spikes, synops, total))):
        _checked.add(key)
    else:
        _turn_off(f"its first {mode} neuron with {levels} levels on {x.device} differed from the tensor path")
    return current


def _turn_off(why: str) -> None:
    """Warn once and stop using the kernel in this process; None (what a declined run returns)."""
    _off.append(why)
    warnings.warn(f"hmtconv's Triton neuron kernel is off for this process: {why}; the tensor path runs "
                  f"instead (same results, slower). Please report it; HMTCONV_GPU_KERNEL=0 silences this.",
                  stacklevel=3)
    return None
