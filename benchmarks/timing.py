"""The one timing rule of every benchmark: a warm-up call, then the median of ``repeats`` calls."""
from __future__ import annotations

import statistics
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
