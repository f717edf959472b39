"""Shared engine of the multi-level integrate-and-fire neurons (H-MT and prior-work MT).

Both neurons are uniform quantizers with reset by subtraction: per step the membrane
``m = v + I`` emits an integer level ``k in [0, levels]`` times a step ``lam`` and keeps
``v = m - k * lam``. They differ only in how many levels a step can carry and in how many
binary spikes a level costs, which each subclass states through ``levels`` and ``spike_lut``.
"""
from __future__ import annotations

import torch

from ..device import KeepsDtype
from ..errors import whole_number
from . import cpu_kernel, gpu_kernel
from .kernel_plan import Plan

MAX_N = 16
MEANS_IN, MEANS_OUT = 1, 2  # the kernels' ``forms`` bits (see MultiLevelNeuron)
CHECKED_LEVELS = 15  # up to this many levels (n <= 4 for H-MT) charge_ checks a rounded quotient


def check_n(n) -> int:
    return whole_number(n, "n (number of thresholds)", 1, MAX_N)


def as_threshold(value, name: str) -> torch.Tensor:
    """A positive, finite threshold as a float tensor (Python numbers keep double precision;
    ``forward`` casts to the input's dtype)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = torch.tensor(float(value), dtype=torch.float64)
    if not isinstance(value, (torch.Tensor, list, tuple)) and type(value).__module__ != "numpy":
        raise TypeError(f"{name} must be a number or a tensor of numbers, got {type(value).__name__} {value!r}")
    t = torch.as_tensor(value).detach().clone()
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    bad = ~torch.isfinite(t) | (t <= 0)
    if bad.any():
        raise ValueError(f"{name} must be finite and > 0 everywhere, got {t[bad].flatten()[0].item()!r} "
                         f"(valid range: (0, inf))")
    return t


def charge_(v: torch.Tensor, current: torch.Tensor, lam: torch.Tensor, levels: int, out: torch.Tensor,
            level: torch.Tensor, scratch: torch.Tensor | None, sign: float = 1.0) -> torch.Tensor:
    """One step in place (eqs. 14-18 in closed form) up to the reset: ``v += sign*current`` (now
    ``m``), writes the level ``k = clamp(floor(m / lam), 0, levels)`` to ``level`` and ``k * lam``
    to ``out``, returns ``level``. :func:`fire_` adds the reset.

    ``k`` is the exact floor of the real quotient (the greedy largest-first firing of eqs. 15-16),
    as ATen's floor division computes it. That division takes an ``fmod`` per element (about 8x a
    plain division), so up to ``CHECKED_LEVELS`` levels the neuron divides, floors and checks
    instead: the rounded quotient is off only where it rounds up to an integer ``q >= 1`` while
    ``m < q*lam``, and there ``m <= out``. ``scratch`` gets ``(m - (1 + eps)*out) * k``, negative
    wherever ``k >= 1`` and ``m <= out`` (and where ``m`` is one ulp above ``out``: a false alarm),
    and floor division redoes those elements only. False alarms grow with the level (an ulp of
    ``m`` is about ``k * 2**-23 * lam``): with 255 levels more than half the ViT's steps had one,
    and the redo then costs more than it saves (``scratch`` may then be None). ``level``, ``out``
    and ``scratch`` are buffers reused across steps: a fresh activation-sized tensor per step
    costs page faults that rival the step itself.
    """
    v.add_(current, alpha=sign)
    checked = checks_quotient(levels, v.device)
    if checked:
        torch.div(v, lam, out=level).floor_()
    else:  # (clamped first: ATen's floor division of an infinite m is NaN, not the top level)
        torch.div(torch.clamp(v, -lam, (levels + 1) * lam, out=level), lam, rounding_mode="floor", out=level)
    torch.mul(level.clamp_(0, levels), lam, out=out)
    if checked:
        _redo_rounded_up(v, lam, levels, out, level, scratch)
    return level


def checks_quotient(levels: int, device: torch.device) -> bool:
    """Whether :func:`charge_` divides and checks (needs ``scratch``) rather than floor-divides:
    on the CPU up to ``CHECKED_LEVELS`` levels. (On other devices the exact floor division costs no
    more than a pass, and the check's data-dependent branch would wait for the device at every step.)"""
    return levels <= CHECKED_LEVELS and device.type == "cpu"


def _redo_rounded_up(m: torch.Tensor, lam: torch.Tensor, levels: int, out: torch.Tensor, level: torch.Tensor,
                     scratch: torch.Tensor) -> None:
    """Exact floor division for the elements whose rounded quotient may have rounded up (see
    :func:`charge_`); one pass and a min when there are none."""
    torch.add(m, out, alpha=-(1 + torch.finfo(m.dtype).eps), out=scratch).mul_(level)
    if scratch.numel() and scratch.amin() < 0:  # (amin of an empty batch is an error)
        suspect = torch.unravel_index(torch.nonzero(scratch.view(-1) < 0).squeeze(1), m.shape)
        step = lam.expand_as(m)[suspect]
        k = torch.div(m[suspect], step, rounding_mode="floor").clamp_(0, levels)
        level[suspect], out[suspect] = k, k * step


def fire_(v: torch.Tensor, current: torch.Tensor, lam: torch.Tensor, levels: int, out: torch.Tensor,
          level: torch.Tensor, scratch: torch.Tensor | None, sign: float = 1.0) -> torch.Tensor:
    """:func:`charge_`, then reset by subtraction: leaves ``v = m - out``; returns ``level``."""
    charge_(v, current, lam, levels, out, level, scratch, sign)
    v.sub_(out)
    return level


class SpikeCounter:
    """Binary spikes of integer levels ``k``, counted in buffers allocated once per forward.

    Without fan-outs, on the CPU, a histogram of the levels suffices (one integer pass, exact;
    elsewhere bincount reads its size back from the device, a synchronization per step); else
    each level's spikes are looked up, summed over the leading (batch) dims first and, with
    fan-outs, dotted with the fan-out map. Calling it returns ``(total, total weighted by fanout
    or None)``.
    """

    def __init__(self, spike_lut: torch.Tensor, fanout: torch.Tensor | None, shape: torch.Size,
                 device: torch.device):
        self.spike_lut, self.fanout = spike_lut.to(device), fanout
        self.histogram = fanout is None and torch.device(device).type == "cpu"
        if self.histogram:
            index_dtype = torch.uint8 if len(spike_lut) <= 256 else torch.int32
            self.index = torch.empty(shape, dtype=index_dtype, device=device)
        else:
            # index_select with int32 indices is ~3x faster than advanced indexing with int64 ones
            self.index = torch.empty(shape, dtype=torch.int32, device=device)
            self.count = torch.empty(shape, dtype=self.spike_lut.dtype, device=device)
            self.batch_dims = tuple(range(len(shape) - (0 if fanout is None else fanout.dim())))

    def __call__(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.index.copy_(k.nan_to_num_(0.0))  # (a NaN input's level: no spike, as the kernels count it)
        if self.histogram:
            hist = torch.bincount(self.index.view(-1), minlength=len(self.spike_lut))
            return (hist.to(torch.float64) * self.spike_lut.to(torch.float64)).sum(), None
        torch.index_select(self.spike_lut, 0, self.index.view(-1), out=self.count.view(-1))
        per_position = self.count.sum(self.batch_dims) if self.batch_dims else self.count
        per_position = per_position.to(torch.float64)
        return per_position.sum(), None if self.fanout is None else (per_position * self.fanout).sum()


def _levels(count: int) -> str:
    return f"{count} level{'s' * (count != 1)}"


class MultiLevelNeuron(KeepsDtype):
    """Multi-step multi-level IF neuron; input and output are ``[T, *shape]`` (time first).

    Attributes set by each call: ``spikes`` (``[T]``, binary spikes per step summed over all
    elements, both halves for signed neurons), when ``fanout`` is set, ``synops`` (``[T]``,
    spikes weighted by the number of synapses each element drives: eq. 32's numerator), and when
    ``sum_outputs`` is set, ``output_sum`` (``shape``: the outputs summed over the steps, added
    step by step from 0 in the input's dtype; the mean output without another pass over memory).

    ``takes_means``: the input holds the running means of the currents (what a compensated op
    computes before it differences them), and step t's current is ``t*x[t] - (t-1)*x[t-1]``;
    ``gives_means``: the output holds the running means of the outputs (what a compensated op
    reading them computes first). Convert sets them between a neuron and a compensated op
    (build.py), which then skips that pass over memory; results are those of per-step values bit
    for bit (the same float32 operations in the same order as compensated.py's).
    ``lam`` keeps its dtype when the neuron is cast (``forward`` casts it to the input's), so a
    cast SNN is saved and rebuilt with the thresholds convert gave it.
    """

    KEEP_DTYPE = ("lam",)
    levels: int
    spike_lut: torch.Tensor

    def __init__(self, step, signed: bool, communicate: bool, levels: int, spike_lut: torch.Tensor):
        super().__init__()
        self.signed = bool(signed)
        self.communicate = bool(communicate) and self.signed
        self.levels = levels
        self.register_buffer("lam", as_threshold(step, "lam"))
        if not torch.equal(spike_lut, spike_lut.round()) or spike_lut.min() < 0:
            raise ValueError(f"spike_lut must hold binary spike counts (non-negative integers), got {spike_lut}")
        if spike_lut.shape != (levels + 1,) or spike_lut[0] != 0:
            raise ValueError(f"spike_lut must give the spikes of levels 0..{levels} ({levels + 1} entries), level 0 "
                             f"(no output) none; got {spike_lut}")
        # (where lam is: the table is made on the CPU)
        self.register_buffer("spike_lut", spike_lut.to(self.lam.device), persistent=False)
        self.fanout: torch.Tensor | None = None
        self.spikes: torch.Tensor | None = None
        self.synops: torch.Tensor | None = None
        self.sum_outputs = False
        self.output_sum: torch.Tensor | None = None
        self.takes_means = self.gives_means = False
        self._kernel_plan: Plan | None = None  # kept between calls (see kernel_plan.Plan)

    # lam is the step of a neuron with `levels` levels: the state_dict's metadata (which torch.save
    # keeps) carries them, so that thresholds of another n do not load silently. (Methods, not
    # hooks: neurons pickled before this existed have them too.)
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata.setdefault(prefix[:-1], {})["levels"] = self.levels

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        saved = local_metadata.get("levels")
        if saved is not None and saved != self.levels:
            args[-1].append(f"{prefix}lam: thresholds of a neuron with {_levels(saved)} cannot load into one with "
                            f"{_levels(self.levels)} (lam depends on n); convert with the n and neuron of the saved SNN")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def extra_repr(self) -> str:
        lam = self.lam
        shown = f"{lam.item():.6g}" if lam.numel() == 1 else f"tensor{tuple(lam.shape)}"
        return f"levels={self.levels}, lam={shown}, signed={self.signed}, communicate={self.communicate}"

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() < 1 or x.shape[0] < 1:
            raise ValueError(f"{type(self).__name__} expects input [T, *shape] with T >= 1, got shape "
                             f"{tuple(x.shape)}")
        lam_shape = tuple(self.lam.shape)
        step_shape = tuple(x.shape[1:])
        # broadcasts to the step shape (in Python: torch.broadcast_shapes costs ~80 us a call)
        if len(lam_shape) > len(step_shape) or any(l not in (1, s) for l, s in zip(lam_shape[::-1], step_shape[::-1])):
            raise ValueError(f"{type(self).__name__}: lam of shape {lam_shape} does not broadcast to the "
                             f"per-step input shape {step_shape} (input {tuple(x.shape)} must be [T, *shape]; "
                             f"did you forget the time dimension?)")

    @property
    def mode(self) -> str:
        return ("communicate" if self.communicate else "signed") if self.signed else "unsigned"

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: where to write the output; may be ``x`` itself, whose step t is read before
        step t of the output is written (saves an activation-sized allocation). Runs the compiled
        CPU kernel or, on CUDA, the Triton kernel where they apply (:func:`cpu_kernel.run`,
        :func:`gpu_kernel.run`), else the equal tensor path."""
        self._check_input(x)
        if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
            raise ValueError(f"{type(self).__name__}: out must be like the input ({tuple(x.shape)}, {x.dtype}, "
                             f"{x.device}), got {tuple(out.shape)}, {out.dtype}, {out.device}")
        out = torch.empty_like(x) if out is None else out
        spikes = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        synops = torch.zeros_like(spikes) if self.fanout is not None else None
        total = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device) if self.sum_outputs else None
        forms = MEANS_IN * self.takes_means + MEANS_OUT * self.gives_means
        args = (x, out, self.lam, self.fanout, self.spike_lut, self.levels, self.mode, spikes, synops,
                self._kernel_plan, total, forms)
        tensor_path = lambda o, s, w, sums: self._forward_tensors(  # noqa: E731
            x, o, self.lam.to(dtype=x.dtype, device=x.device), s, w, sums)
        self._kernel_plan = cpu_kernel.run(*args) or gpu_kernel.run(*args, tensor_path=tensor_path)
        if self._kernel_plan is None:
            tensor_path(out, spikes, synops, total)
        self.spikes, self.synops, self.output_sum = spikes, synops, total
        return out

    def _forward_tensors(self, x: torch.Tensor, out: torch.Tensor, lam: torch.Tensor, spikes: torch.Tensor,
                         synops: torch.Tensor | None, total: torch.Tensor | None = None) -> None:
        steps, shape = x.shape[0], x.shape[1:]
        count = SpikeCounter(self.spike_lut, self.fanout, shape, x.device)
        level = torch.empty(shape, dtype=x.dtype, device=x.device)
        scratch = torch.empty_like(level) if checks_quotient(self.levels, x.device) else None
        v_pos = (lam / 2).expand(shape).clone()  # eq. 13
        if self.signed:
            v_neg = v_pos.clone()
            out_pos, out_neg = torch.empty_like(v_pos), torch.empty_like(v_pos)
            level_neg = torch.empty_like(level) if self.communicate else None  # (both levels kept till counted)
        sums = torch.empty_like(v_pos) if total is None and self.gives_means else total
        if sums is not None:
            sums.zero_()
        scaled = torch.zeros_like(v_pos) if self.takes_means else None
        for t in range(steps):
            current = x[t]
            if scaled is not None:  # compensated.step_difference's operations: t*x[t] - (t-1)*x[t-1]
                step = current * (t + 1)
                current = step - scaled
                scaled = step
            if self.signed and self.communicate:
                # Eq. 21 with Lemma 4.1: v_P + v_N = lam, so at most one half fires per step
                # (in floating point too while lam exceeds the membranes' rounding error, about
                # 2^-24 of |v| in float32). Then resetting both halves and exchanging their outputs
                # is v_P -= out, v_N += out (bit for bit: the other half's output is exactly 0;
                # and it is eq. 21's reset even where rounding lets both fire, in bfloat16 or
                # with |v| near 2^24 lam, whose spikes are then counted too): three passes fewer.
                charge_(v_pos, current, lam, self.levels, out_pos, level, scratch)
                charge_(v_neg, current, lam, self.levels, out_neg, level_neg, scratch, sign=-1.0)
                torch.sub(out_pos, out_neg, out=out[t])
                v_pos.sub_(out[t])
                v_neg.add_(out[t])
                counts = [count(level), count(level_neg)]
            elif self.signed:
                counts = [count(fire_(v_pos, current, lam, self.levels, out_pos, level, scratch)),
                          count(fire_(v_neg, current, lam, self.levels, out_neg, level, scratch, sign=-1.0))]
                torch.sub(out_pos, out_neg, out=out[t])
            else:
                counts = [count(fire_(v_pos, current, lam, self.levels, out[t], level, scratch))]
            spikes[t] = sum(c[0] for c in counts)
            if synops is not None:
                synops[t] = sum(c[1] for c in counts)
            if sums is not None:  # the kernel's order of additions: from 0, step by step
                sums.add_(out[t])
            if self.gives_means:  # divided below, by a tensor: ATen multiplies by the reciprocal of a scalar
                out[t].copy_(sums)
        if self.gives_means:
            out.div_(torch.arange(1, steps + 1, dtype=out.dtype, device=out.device).view(-1, *[1] * (out.dim() - 1)))
