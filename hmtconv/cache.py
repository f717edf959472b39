"""Where hmtconv keeps what it makes once per machine (compiled kernels, the demo's trained model,
decoded MNIST): ``$HMTCONV_CACHE``, default ``~/.cache/hmtconv``."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Absolute (a relative one given in ``$HMTCONV_CACHE`` is taken from the current directory
    now: a bare file name would send ``dlopen`` searching the library path)."""
    return Path(os.environ.get("HMTCONV_CACHE") or Path.home() / ".cache" / "hmtconv").absolute()
