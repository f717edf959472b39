"""Checkpoints written by ``hmtconv train``: loadable with ``torch.load(weights_only=True)``.

A checkpoint is a dict ``{"format", "arch", "kwargs", "meta", "state_dict"}``: the built-in
architecture's registry name and builder kwargs (plain JSON-able data), metadata, and weights.
Loading it never runs code from the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import UserError
from .registry import create_model

FORMAT = "hmtconv-checkpoint-v1"


def save_checkpoint(path: str | Path, model: nn.Module, arch: str, kwargs: dict, meta: dict) -> Path:
    """Write atomically (see ``atomic_path``) so a crash or a concurrent reader never sees half a file."""
    json.dumps({"kwargs": kwargs, "meta": meta})  # fail here, not at load time, on non-JSON-able values
    record = {"format": FORMAT, "arch": arch, "kwargs": kwargs, "meta": meta, "state_dict": model.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(record, tmp)
    return Path(path)


def is_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def model_from_checkpoint(record: dict, path: str | Path) -> nn.Module:
    """Rebuild the architecture from a loaded checkpoint dict and load its weights."""
    try:
        model = create_model(record["arch"], **record["kwargs"])
        model.load_state_dict(record["state_dict"])
    except (TypeError, RuntimeError) as error:  # written by a version whose architecture differs
        reason = " ".join(str(error).split())
        raise UserError(f"checkpoint {path}: its {record['arch']} does not match this hmtconv's ({reason}); "
                        f"train it again with this version") from error
    return model.eval()


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """``(model in eval mode, meta)`` from a checkpoint file."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} not found")
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not is_checkpoint(record):
        raise UserError(f"{path} is not an hmtconv checkpoint (written by `hmtconv train`)")
    return model_from_checkpoint(record, path), record["meta"]
