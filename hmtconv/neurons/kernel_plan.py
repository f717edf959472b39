"""What the neuron kernels (CPU: ``cpu_kernel``, CUDA: ``gpu_kernel``) share: the plan of one
input layout (thresholds and fan-outs flattened in its memory order, kept between calls) and the
run around a kernel's launch (views in memory order, copies where a layout has none)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import native


def _per_sample(value: torch.Tensor, shape: torch.Size, order: list[int]) -> torch.Tensor | None:
    """``value`` broadcast to one sample of ``shape`` (``[B, *rest]``), its dims in ``order``
    (``x``'s, less time), flat and contiguous; None where it varies along the batch dim."""
    full = value.expand(shape)
    if len(shape) < 2:
        return full.contiguous()
    if full.stride(0) != 0 and shape[0] != 1:
        return None
    return full[0].permute([d - 2 for d in order[2:]]).contiguous().view(-1)


@dataclass
class Plan:
    """The kernel's arguments besides the data, for one input layout and one set of thresholds,
    fan-outs and spike table (``ok`` False where the kernel declines them). Building it costs
    about ten small tensor ops, several times the kernel's own time on a small site, so a neuron
    keeps it while the layout stays and its tensors are neither replaced nor changed."""
    key: tuple
    contents: tuple  # what each tensor of the key held when planned (_contents)
    ok: bool
    order: list[int] | None = None  # x's dims in memory order (time and batch first), or None: copy
    lam: torch.Tensor | None = None
    fanout: torch.Tensor | None = None
    lut: torch.Tensor | None = None


def _key(x: torch.Tensor, tensors: tuple[torch.Tensor | None, ...]) -> tuple:
    # Tensors by identity; a plan holds them, so their ids cannot be reused meanwhile.
    return x.shape, x.stride(), x.device, tensors


def _contents(t: torch.Tensor | None):
    """What tells that ``t`` was changed: on the CPU a copy of it (a write through ``.data``
    leaves the version counter as it was), elsewhere its version counter, which costs no
    synchronization with the device (a copy for an inference tensor, which has none)."""
    if t is None:
        return None
    return t.clone() if t.device.type == "cpu" or t.is_inference() else t._version


def _same(previous: Plan, key: tuple) -> bool:
    if previous.key[:3] != key[:3] or any(u is not v for u, v in zip(previous.key[3], key[3])):
        return False
    return all(t is None or (torch.equal(t, c) if isinstance(c, torch.Tensor) else t._version == c)
               for t, c in zip(key[3], previous.contents))


def plan(x: torch.Tensor, lam: torch.Tensor, fanout: torch.Tensor | None, spike_lut: torch.Tensor,
         previous: Plan | None = None) -> Plan:
    """``previous`` where it still applies, else a new plan: the memory order of ``x``, ``lam``
    (float32) and the fan-outs flattened in it, the spike table as int32. Declined: ``lam`` or
    the fan-outs varying along the batch dim, ``lam`` outside ``(2**-100, 2**100)`` (1/lam must be
    a normal float for the level's one-step correction to suffice, see cpu_kernel.c), fan-outs
    that are not int32 integers (their weighted sums would then depend on order; spike counts are
    integers by construction)."""
    key = _key(x, (lam, fanout, spike_lut))
    if previous is not None and _same(previous, key):
        return previous
    contents = tuple(_contents(t) for t in key[3])
    lam = lam.to(dtype=torch.float32, device=x.device)  # the tensor path's cast
    if not 2.0**-100 < lam.amin().item() <= lam.amax().item() < 2.0**100:
        return Plan(key, contents, False)
    order = native.memory_order(x, 2)  # time and batch first
    shape = x.shape[1:]
    lam_flat = _per_sample(lam, shape, order or list(range(x.dim())))
    fan_flat = None if fanout is None else _per_sample(fanout, shape, order or list(range(x.dim())))
    fan_int = None if fan_flat is None else fan_flat.to(torch.int32)
    if lam_flat is None or (fanout is not None and fan_flat is None) or \
            (fan_int is not None and not torch.equal(fan_int.to(fan_flat.dtype), fan_flat)):
        return Plan(key, contents, False)
    return Plan(key, contents, True, order, lam_flat, fan_int, spike_lut.to(device=x.device, dtype=torch.int32))


# launch(src, dst, sums or None, T, B, P, plan, levels, mode, forms, spikes, synops or None): all
# steps of src [T, B, P] (contiguous) into dst, the outputs' sum over steps into sums, adding to
# the [T] float64 spikes and synops; forms: bit MEANS_IN, MEANS_OUT (multilevel.py)
Launch = Callable[..., None]


def run_planned(launch: Launch, x: torch.Tensor, out: torch.Tensor, lam: torch.Tensor, fanout: torch.Tensor | None,
                spike_lut: torch.Tensor, levels: int, mode: str, spikes: torch.Tensor, synops: torch.Tensor | None,
                previous: Plan | None = None, total: torch.Tensor | None = None, forms: int = 0) -> Plan | None:
    """All steps of ``x`` (``[T, *shape]``) into ``out`` by ``launch``, adding to ``spikes`` and
    ``synops`` (``[T]`` float64), and the outputs' sum over the steps into ``total`` (``shape``;
    None: not wanted); returns the plan it ran with (pass it back as ``previous`` next time), or
    None, with nothing written, where :func:`plan` declines. The neuron is elementwise, so a
    permuted view (attention's heads) runs in its memory order, thresholds and fan-outs permuted
    alike; other strided inputs go through a contiguous copy."""
    current = plan(x, lam, fanout, spike_lut, previous)
    if not current.ok:
        return None
    order = current.order
    src, spare = (x.permute(order), False) if order is not None else (x.contiguous(), True)
    target = out.permute(order) if order is not None else out
    dst = target if target.is_contiguous() else src if spare else torch.empty_like(src)
    sum_target = None if total is None else total.permute([d - 1 for d in order[1:]]) if order is not None else total
    sums = sum_target if sum_target is None or sum_target.is_contiguous() else torch.empty_like(src[0])
    batch = x.shape[1] if x.dim() > 2 else 1
    launch(src, dst, sums, x.shape[0], batch, x[0].numel() // batch, current, levels, mode, forms, spikes, synops)
    if dst is not target:
        target.copy_(dst)
    if sums is not sum_target:
        sum_target.copy_(sums)
    return current
