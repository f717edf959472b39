"""All T steps of a multi-level IF neuron in one launch (Triton, float32): the operations of
``cpu_kernel.c``, in its order, so that results equal the tensor path's bit for bit.

A program keeps the membranes of ``BLOCK`` positions (of the flat ``[B * P]`` sample positions)
in registers while the steps stream through: ``m = v + x`` (``v - x`` for the Neg half), ``k`` =
the exact floor of the real ``m / lam`` clamped to ``[0, levels]`` (no division: a truncated
product with a slightly small ``1 / lam`` and one step up where the exact sign of
``(k + 1) * lam - m`` says so, the product exact in float64), ``out = k * lam``, reset by
subtraction; with communication only the larger half's level (Lemma 4.1). Launched with
``enable_fp_fusion=False``: a fused multiply-add where the tensor path has none would round
differently. Binary spikes (and the same weighted by fan-out) are integers, summed per program
and added atomically: exact in any order. ``FORMS`` as ``cpu_kernel.c``'s (running means in, out).
"""
import triton
import triton.language as tl

SHRINK = tl.constexpr(1.0 - 2.0**-21)  # 1 / lam shrunk so that m * inv is never above m / lam (see cpu_kernel.c)


@triton.jit
def _level(m, lam, inv, LEVELS: tl.constexpr):
    """The exact floor of the real m / lam in [0, LEVELS]; NaN stays NaN (cpu_kernel.c level_of)."""
    q = m * inv
    c = tl.where(q < 0.0, 0.0, q)
    k = tl.floor(tl.where(c > LEVELS, LEVELS * 1.0, c))  # c >= 0: floor is the truncation
    up = ((k + 1.0).to(tl.float64) * lam.to(tl.float64) - m.to(tl.float64) <= 0.0) & (k < LEVELS)
    return tl.where(up, k + 1.0, k)


@triton.jit
def _spikes(lut_ptr, k, mask, LEVELS: tl.constexpr):
    """Binary spikes of level k (an index of 0 where k is NaN, as cpu_kernel.c's index_of)."""
    index = tl.where(k == k, k, 0.0).to(tl.int32)
    return tl.load(lut_ptr + tl.minimum(tl.maximum(index, 0), LEVELS), mask=mask, other=0).to(tl.int64)


@triton.jit
def neuron_steps(x_ptr, out_ptr, sum_ptr, lam_ptr, fan_ptr, lut_ptr, count_ptr, T, N, P,
                 LEVELS: tl.constexpr, MODE: tl.constexpr, FORMS: tl.constexpr, HAS_FANOUT: tl.constexpr,
                 HAS_SUM: tl.constexpr, BLOCK: tl.constexpr):
    """x, out: [T, N] (N = B * P positions); lam, fan: [P]; sum: [N]; count: [2, T] int64 (spikes,
    then spikes weighted by fan-out), added to. MODE 0: unsigned, 1: signed, 2: with communication.
    FORMS bit 1: x holds running means of the currents; bit 2: out gets running means of the outputs."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    p = offs % P
    lam = tl.load(lam_ptr + p, mask=mask, other=1.0)
    inv = (1.0 / lam) * SHRINK
    vp = lam * 0.5  # eq. 13
    vn = lam * 0.5
    total = tl.zeros([BLOCK], dtype=tl.float32)
    scaled = tl.zeros([BLOCK], dtype=tl.float32)  # t * (mean of currents 1..t) at the last step
    if HAS_FANOUT:
        fan = tl.load(fan_ptr + p, mask=mask, other=0).to(tl.int64)
    xs, outs = x_ptr + offs, out_ptr + offs  # (64-bit addresses, moved a step at a time: no int32 overflow)
    for t in range(T):
        steps = t + 1.0  # (a float32 scalar: the step count, exact)
        x = tl.load(xs, mask=mask, other=0.0)
        if FORMS & 1:  # the step's current from running means, as the compensation's step difference
            s = x * steps
            x = s - scaled
            scaled = s
        mp = vp + x
        if MODE == 2:  # eq. 21: both halves reset by the net output; only the larger can fire
            mn = vn - x
            pos = mp >= mn
            k = _level(tl.where(pos, mp, mn), lam, inv, LEVELS)
            mag = k * lam
            o = tl.where(pos, mag, 0.0 - mag)
            vp = mp - o
            vn = mn + o
            c = _spikes(lut_ptr, k, mask, LEVELS)
        elif MODE == 1:
            k = _level(mp, lam, inv, LEVELS)
            op = k * lam
            mn = vn - x
            kn = _level(mn, lam, inv, LEVELS)
            on = kn * lam
            o = op - on
            vp = mp - op
            vn = mn - on
            c = _spikes(lut_ptr, k, mask, LEVELS) + _spikes(lut_ptr, kn, mask, LEVELS)
        else:
            k = _level(mp, lam, inv, LEVELS)
            o = k * lam
            vp = mp - o
            c = _spikes(lut_ptr, k, mask, LEVELS)
        if HAS_SUM or FORMS & 2:
            total += o
        if FORMS & 2:
            tl.store(outs, tl.div_rn(total, steps), mask=mask)
        else:
            tl.store(outs, o, mask=mask)
        xs += N
        outs += N
        tl.atomic_add(count_ptr + t, tl.sum(c, axis=0))
        if HAS_FANOUT:
            tl.atomic_add(count_ptr + T + t, tl.sum(c * fan, axis=0))
    if HAS_SUM:
        tl.store(sum_ptr + offs, total, mask=mask)
