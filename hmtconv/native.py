"""Compiled CPU kernels: plain C files next to the Python that calls them, built on first use.

Each ``.c`` file is built once per machine with the system's C compiler (no torch headers: well
under a second) into ``$HMTCONV_CACHE`` (default ``~/.cache/hmtconv``) and loaded with ctypes.
Without a compiler, or where every build fails, :func:`load` warns once and returns None, and
the caller keeps its tensor path; ``HMTCONV_CPU_KERNEL=0`` turns every kernel off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from .cache import cache_dir


def enabled() -> bool:
    return os.environ.get("HMTCONV_CPU_KERNEL", "1") != "0"


def applies(x: torch.Tensor) -> bool:
    """Kernels on, and ``x`` a non-empty float32 CPU tensor: what every kernel here takes."""
    return enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0


def memory_order(x, leading: int) -> list[int] | None:
    """A permutation of ``x``'s dims, its first ``leading`` dims kept first, under which ``x`` is
    contiguous (a transposed or unflattened view of a contiguous tensor: attention's heads), so an
    elementwise kernel can walk it in memory order; None where there is none."""
    order = [*range(min(leading, x.dim())), *sorted(range(leading, x.dim()), key=lambda d: -x.stride(d))]
    return order if x.permute(order).is_contiguous() else None


def candidate_flags() -> list[tuple[list[str], bytes]]:
    """Compiler flags to try, best first, each with what else its library depends on (its cache
    key): OpenMP (clang often lacks it) and the CPU's own vector width (AVX2 runs the neuron about
    1.4x faster than SSE, AVX-512 on a Zen 5 1.7x faster than AVX2; keyed by the CPU's flags), then
    less, down to the plain build."""
    # -ffp-contract=off: a fused multiply-add would round differently from the tensor paths;
    # -fno-trapping-math lets selects vectorize (results are unchanged).
    base = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        native = [([*base, "-march=native", "-fopenmp"], cpu.encode()), ([*base, "-march=native"], cpu.encode())]
    except (OSError, StopIteration):
        native = []
    return [*native, ([*base, "-fopenmp"], b""), (base, b"")]


def build(source: Path, compiler: str, flags: list[str], cpu: bytes) -> Path:
    """Compile ``source`` into the cache, atomically (a concurrent process sees no file or the
    whole one). ``compiler`` is a shell-style command line, as ``$CC`` often is (``ccache gcc``)."""
    key = hashlib.sha256(source.read_bytes() + " ".join([compiler, *flags, platform.machine()]).encode() + cpu)
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([*shlex.split(compiler), *flags, str(source), "-o", tmp, "-lm"], check=True,
                           capture_output=True, text=True, timeout=120)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


@functools.cache
def load(source: Path, fallback: str) -> ctypes.CDLL | None:
    """``source``'s library, or None (with one warning saying why, and that ``fallback``, e.g.
    "neurons run", on the slower tensor path) where it cannot be built."""
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    compiler = os.environ.get("CC") or (found and shlex.quote(found))  # $CC may hold a wrapper or flags
    if compiler is None:
        warnings.warn(f"hmtconv: no C compiler found, so {fallback} on the slower tensor path (install gcc "
                      f"or clang; HMTCONV_CPU_KERNEL=0 silences this)", stacklevel=3)
        return None
    for flags, cpu in candidate_flags():
        try:
            return ctypes.CDLL(str(build(source, compiler, flags, cpu)))
        except (OSError, subprocess.SubprocessError) as err:
            error = getattr(err, "stderr", "") or err
    warnings.warn(f"hmtconv: building {source.name} with {compiler} failed, so {fallback} on the slower "
                  f"tensor path (HMTCONV_CPU_KERNEL=0 silences this): {error}", stacklevel=3)
    return None


def bind(source: Path, fallback: str, signatures: dict[str, tuple[list, object]]) -> ctypes.CDLL | None:
    """:func:`load`, with each function's ``(argtypes, restype)`` declared."""
    lib = load(source, fallback)
    for name, (argtypes, restype) in signatures.items() if lib is not None else ():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
    return lib
