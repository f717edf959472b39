"""Keep freed memory in the process (glibc), so large tensors stop costing page faults; pause
Python's cyclic garbage collector while a model runs.

A simulation allocates and frees ``[T*B, ...]`` activations (tens to hundreds of MiB) at every
layer. glibc serves blocks that large with fresh ``mmap``s and returns them at ``free``, so every
new tensor is first touched page by page (a fault and a zeroed 4 KiB page each): measured on the
ViT at T = 16, batch 32, 65,000-80,000 minor faults (about 300 MiB) per evaluation and 25 % of its
time. :func:`keep_freed_memory` makes glibc serve them from its heap and keep what is freed; the
CLI calls it (``HMTCONV_KEEP_MEMORY=0`` opts out); a library user may call
``hmtconv.keep_freed_memory()`` in their own process.
The price: the process keeps its peak memory instead of returning it between layers.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>


def keep_freed_memory(mmap_threshold: int = 2**30, trim_threshold: int = 2**31 - 1) -> bool:
    """Blocks under ``mmap_threshold`` bytes from the heap, and up to ``trim_threshold`` bytes of
    freed heap kept; False (nothing changed) where the C library is not glibc or refuses."""
    if os.environ.get("HMTCONV_KEEP_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold) and mallopt(M_TRIM_THRESHOLD, trim_threshold))


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off inside (restored after): a forward pass makes
    thousands of short-lived objects, whose count sets off collections that also traverse every
    long-lived one (the SNN's graph and modules): 3-4 % of a ViT evaluation here. Reference
    counting still frees every tensor at once; only cycles wait for the next collection."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
