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

SOURCE = Path(__file__).with_name("cpu_kernel.c")
MODES = {"unsigned": 0, "signed": 1, "communicate": 2}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel's library (see :func:`hmtconv.native.load`), or None."""
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    return native.bind(SOURCE, "neurons run",
                       {"hmt_neuron_forward": ([p, p, i64, i64, i64, p, p, p, i64, c_int, c_int, p, p], None)})


def _per_sample(value: torch.Tensor, shape: torch.Size, order: list[int]) -> torch.Tensor | None:
    """``value`` broadcast to one sample of ``shape`` (``[B, *rest]``), its dims in ``order``
    (``x``'s, less time), flat and contiguous; None where it varies along the batch dim."""
    full = value.expand(shape)
    if len(shape) < 2:
        return full.contiguous()
    if full.stride(0) != 0 and shape[0] != 1:
        return None
    return full[0].permute([d - 2 for d in order[2:]]).contiguous().view(-1)


def run(x: torch.Tensor, out: torch.Tensor, lam: torch.Tensor, fanout: torch.Tensor | None,
        spike_lut: torch.Tensor, levels: int, mode: str, spikes: torch.Tensor,
        synops: torch.Tensor | None) -> bool:
    """All steps of ``x`` (``[T, *shape]``) into ``out``, adding to ``spikes`` and ``synops``
    (``[T]`` float64); False, with nothing written, where the kernel does not apply: off, not
    built, not a float32 CPU tensor, ``lam`` varying along the batch dim or outside
    ``(2**-100, 2**100)``, or fan-outs that are not int32 integers (their weighted sums would then
    depend on order; spike counts are integers by construction). The neuron is elementwise, so a
    permuted view (attention's heads) runs in its memory order, thresholds and fan-outs permuted
    alike; other strided inputs go through a contiguous copy."""
    if not (native.enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0):
        return False
    # 1/lam must be a normal float for the level's one-step correction to suffice (see the C)
    if not 2.0**-100 < lam.amin().item() <= lam.amax().item() < 2.0**100 or library() is None:
        return False
    order = native.memory_order(x, 2)  # time and batch first
    src, spare = (x.permute(order), None) if order is not None else (x.contiguous(), True)
    order = order or list(range(x.dim()))
    shape = x.shape[1:]
    lam_flat = _per_sample(lam, shape, order)
    fan_flat = None if fanout is None else _per_sample(fanout, shape, order)
    fan_int = None if fan_flat is None else fan_flat.to(torch.int32)
    if lam_flat is None or (fan_int is not None and not torch.equal(fan_int.to(fan_flat.dtype), fan_flat)):
        return False
    target = out.permute(order)
    dst = target if target.is_contiguous() else src if spare else torch.empty_like(src)
    batch = shape[0] if len(shape) > 1 else 1
    sink = torch.zeros_like(spikes) if synops is None else synops
    lut = spike_lut.to(torch.int32)  # named: a temporary's memory could be freed before the call reads it
    library().hmt_neuron_forward(
        src.data_ptr(), dst.data_ptr(), x.shape[0], batch, x[0].numel() // batch, lam_flat.data_ptr(),
        None if fan_int is None else fan_int.data_ptr(), lut.data_ptr(), levels, MODES[mode],
        torch.get_num_threads(), spikes.data_ptr(), sink.data_ptr())
    if dst is not target:
        target.copy_(dst)
    return True
