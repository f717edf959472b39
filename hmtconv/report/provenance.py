"""Where a number came from: configuration, versions, device, seed and the git commit."""
from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str | None:
    """The commit of the hmtconv checkout (with ``+dirty`` if modified), or None outside one (an
    installed hmtconv inside the user's own repository is not that repository's code)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()
    try:
        top, commit = git("rev-parse", "--show-toplevel", "HEAD").splitlines()
        if Path(top).resolve() != root:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError, ValueError):  # (ValueError: not the two lines asked for)
        return None
    return commit + ("+dirty" if dirty else "")


def jsonable(options: dict) -> dict:
    """Command-line options as JSON: paths as strings, callables (argparse's handlers) dropped."""
    out = {}
    for key, value in options.items():
        if callable(value):
            continue
        out[key] = str(value) if isinstance(value, Path) else value
    return out


def library_versions() -> dict[str, str]:
    """Versions of hmtconv and the libraries its numbers depend on."""
    import torchvision

    from .. import __version__

    # str(): torch.__version__ is a TorchVersion, which weights_only checkpoints cannot hold
    return {"hmtconv": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}


def provenance(config: dict, *, seed: int | None = None, device: str | None = None) -> dict:
    """A JSON-able record that lets anyone trace and re-run a result."""
    return {
        "config": config,
        "seed": seed,
        "device": device,
        "versions": library_versions() | {"python": platform.python_version()},
        "git_commit": git_commit(),
        "host": platform.node(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
