"""The measuring rules of every benchmark: time = a warm-up call, then the median of ``repeats``
calls; memory = the peak resident size (Linux) of a fresh process, from a point it marks on."""
from __future__ import annotations

import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time


def timed(fn, repeats: int):
    """``(median seconds, result of the last call)``."""
    (seconds,), (result,) = timed_side_by_side([fn], repeats)
    return seconds, result


def timed_side_by_side(fns, repeats: int) -> tuple[list[float], list]:
    """Median seconds of each of ``fns`` and the result of its last call; one warm-up call each
    (allocator, caches, lazy initialisation), then all called in turn in every repeat, so that a
    change in the machine's load between repeats hits all of them alike."""
    results = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times], results


def _status_mib(field: str) -> float:
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024


def rss_mib() -> float:
    """Resident memory of this process now, in MiB (Linux)."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started or since :func:`reset_peak`, in MiB
    (Linux's VmHWM; not ``ru_maxrss``, which a child inherits from the parent process it forked from)."""
    return _status_mib("VmHWM")


def reset_peak() -> None:
    """Hand the allocator's free memory back to the system (glibc ``malloc_trim``), so that the
    current resident size does not depend on what ran before, and start the peak (VmHWM) again
    from it (Linux >= 4.0)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def in_fresh_process(script: str, *args, exact_malloc: bool = True) -> dict:
    """Run ``python script --child *args`` and return the JSON object it prints on its last line
    (its stderr passes through, so a failure shows its traceback).

    ``exact_malloc``: the child's glibc serves every block of 64 KiB or more with its own mmap,
    returned to the system when freed (``MALLOC_MMAP_THRESHOLD_``), so its RSS follows the live
    tensors (about a third slower). glibc's default keeps freed blocks resident: the RSS is what a
    user sees, but its peak depends on fragmentation (a smaller evaluate chunk can peak higher)."""
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"}
    if exact_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, script, "--child", *map(str, args)],
                         stdout=subprocess.PIPE, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])
