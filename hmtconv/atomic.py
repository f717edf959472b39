"""Atomic file writes: a reader, a crash, a full disk or Ctrl-C never leaves half a file behind."""
from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``, with the same suffix, for the caller to write; on
    success it is fsynced and renamed over ``path``, on any error removed (``path`` untouched).

    The file gets the mode ``open()`` gives a new file (``0o666`` less the umask), or the mode of
    the file it replaces.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem.lstrip('.')}-{secrets.token_hex(6)}{path.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as with open()
    try:
        mode = stat.S_IMODE((path if path.exists() else tmp).stat().st_mode)
        yield tmp
        os.chmod(tmp, mode)  # (again: a writer may replace the file, as safetensors does)
        fd = os.open(tmp, os.O_RDONLY)  # the writer (torch.save, matplotlib, safetensors) may not have synced
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
