"""The compiled CPU kernel of the multi-level neuron (``cpu_kernel.c``), built on first use.

The tensor path of :class:`~hmtconv.neurons.multilevel.MultiLevelNeuron` makes about twenty
passes over memory per step, each a separate ATen call; this kernel runs all T steps of a neuron
in one call and one pass, equal to the tensor path bit for bit (outputs, spikes, synaptic
operations). Built on first use by :mod:`hmtconv.native`; without a compiler the neuron keeps the
tensor path.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import native
from .kernel_plan import Plan, run_planned

SOURCE = Path(__file__).with_name("cpu_kernel.c")
MODES = {"unsigned": 0, "signed": 1, "communicate": 2}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel's library (see :func:`hmtconv.native.load`), or None."""
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    return native.bind(SOURCE, "neurons run",
                       {"hmt_neuron_forward": ([p, p, p, i64, i64, i64, p, p, p, i64, c_int, c_int, c_int, p, p], None)})


def _launch(src, dst, sums, steps, batch, per_sample, current: Plan, levels, mode, forms, spikes, synops) -> None:
    sink = torch.zeros_like(spikes) if synops is None else synops
    library().hmt_neuron_forward(
        src.data_ptr(), dst.data_ptr(), None if sums is None else sums.data_ptr(), steps, batch, per_sample,
        current.lam.data_ptr(), None if current.fanout is None else current.fanout.data_ptr(),
        current.lut.data_ptr(), levels, MODES[mode], forms, torch.get_num_threads(), spikes.data_ptr(), sink.data_ptr())


def run(x: torch.Tensor, out: torch.Tensor, lam: torch.Tensor, fanout: torch.Tensor | None,
        spike_lut: torch.Tensor, levels: int, mode: str, spikes: torch.Tensor,
        synops: torch.Tensor | None, previous: Plan | None = None, total: torch.Tensor | None = None,
        forms: int = 0) -> Plan | None:
    """:func:`~hmtconv.neurons.kernel_plan.run_planned` with this kernel, or None, with nothing
    written, where it does not apply: off, not built, not a float32 CPU tensor. ``lam`` may be the
    neuron's own (float64) threshold: it is cast as the tensor path casts it."""
    if not native.applies(x) or library() is None:
        return None
    return run_planned(_launch, x, out, lam, fanout, spike_lut, levels, mode, spikes, synops, previous, total, forms)
