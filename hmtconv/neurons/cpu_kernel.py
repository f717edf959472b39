"""The compiled CPU kernel of the multi-level neuron (``cpu_kernel.c``), built on first use.

The tensor path of :class:`~hmtconv.neurons.multilevel.MultiLevelNeuron` makes about twenty
passes over memory per step, each a separate ATen call; this kernel runs all T steps of a neuron
in one call and one pass, equal to the tensor path bit for bit (outputs, spikes, synaptic
operations). It is built once per machine with the system's C compiler (no torch headers: well
under a second) into ``$HMTCONV_CACHE`` (default ``~/.cache/hmtconv``) and loaded with ctypes.
Without a compiler the neuron keeps the tensor path and :func:`load` warns once;
``HMTCONV_CPU_KERNEL=0`` turns the kernel off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernel.c")
MODES = {"unsigned": 0, "signed": 1, "communicate": 2}


def enabled() -> bool:
    return os.environ.get("HMTCONV_CPU_KERNEL", "1") != "0"


def _candidate_flags() -> list[tuple[list[str], bytes]]:
    """Compiler flags to try, best first, each with what else its library depends on (its cache
    key): OpenMP (clang often lacks it) and the CPU's own vector width (AVX2 runs the neuron about
    1.4x faster than SSE; keyed by the CPU's flags), then less, down to the plain build."""
    # -ffp-contract=off: a fused multiply-add would round differently from the tensor path;
    # -fno-trapping-math lets the selects of the level vectorize (results are unchanged).
    base = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        native = [([*base, "-march=native", "-fopenmp"], cpu.encode()), ([*base, "-march=native"], cpu.encode())]
    except (OSError, StopIteration):
        native = []
    return [*native, ([*base, "-fopenmp"], b""), (base, b"")]


def _build(compiler: str, flags: list[str], cpu: bytes) -> Path:
    """Compile into the cache, atomically (a concurrent process sees no file or the whole one)."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags, platform.machine()]).encode() + cpu)
    target = Path(os.environ.get("HMTCONV_CACHE", Path.home() / ".cache" / "hmtconv")) / \
        f"cpu_kernel-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True,
                           text=True, timeout=120)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel's library, or None (with one warning saying why) where it cannot be built."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        warnings.warn("hmtconv: no C compiler found, so neurons run on the slower tensor path (install gcc "
                      "or clang; HMTCONV_CPU_KERNEL=0 silences this)", stacklevel=2)
        return None
    for flags, cpu in _candidate_flags():
        try:
            lib = ctypes.CDLL(str(_build(compiler, flags, cpu)))
            break
        except (OSError, subprocess.SubprocessError) as err:
            error = getattr(err, "stderr", "") or err
    else:
        warnings.warn(f"hmtconv: building the CPU neuron kernel with {compiler} failed, so neurons run on the "
                      f"slower tensor path (HMTCONV_CPU_KERNEL=0 silences this): {error}", stacklevel=2)
        return None
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.hmt_neuron_forward.argtypes = [p, p, i64, i64, i64, p, p, p, i64, c_int, c_int, p, p]
    lib.hmt_neuron_forward.restype = None
    return lib


def _memory_order(x: torch.Tensor) -> list[int] | None:
    """A permutation of ``x``'s dims, time and batch first, under which ``x`` is contiguous (a
    transposed or unflattened view of a contiguous tensor: attention's heads), or None."""
    if x.dim() < 3:
        return list(range(x.dim())) if x.is_contiguous() else None
    order = [0, 1, *sorted(range(2, x.dim()), key=lambda d: -x.stride(d))]
    return order if x.permute(order).is_contiguous() else None


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
    if not (enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0):
        return False
    # 1/lam must be a normal float for the level's one-step correction to suffice (see the C)
    if not 2.0**-100 < lam.amin().item() <= lam.amax().item() < 2.0**100 or load() is None:
        return False
    order = _memory_order(x)
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
    load().hmt_neuron_forward(
        src.data_ptr(), dst.data_ptr(), x.shape[0], batch, x[0].numel() // batch, lam_flat.data_ptr(),
        None if fan_int is None else fan_int.data_ptr(), lut.data_ptr(), levels, MODES[mode],
        torch.get_num_threads(), spikes.data_ptr(), sink.data_ptr())
    if dst is not target:
        target.copy_(dst)
    return True
