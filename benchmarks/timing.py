"""The measuring rules of every benchmark: time = a warm-up call, then the median of ``repeats``
calls; memory = the peak resident size of a fresh process that did nothing else."""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time


def timed(fn, repeats: int):
    """``(median seconds, result of the last call)``."""
    fn()  # warm-up: allocator, caches, lazy initialisation
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_fresh_process(script: str, *args) -> dict:
    """Run ``python script --child *args`` and return the JSON object it prints on its last line
    (its stderr passes through, so a failure shows its traceback)."""
    out = subprocess.run([sys.executable, script, "--child", *map(str, args)],
                         stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
