"""Where hmtconv keeps what it makes once per machine (compiled kernels, the demo's trained model,
decoded MNIST): ``$HMTCONV_CACHE``, default ``~/.cache/hmtconv``."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("HMTCONV_CACHE", Path.home() / ".cache" / "hmtconv"))
